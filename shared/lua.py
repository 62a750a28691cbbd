"""The named Lua scripts: every job and node state change happens inside one of these, atomically.

Each body first binds ``KEYS``/``ARGV`` to named locals, then calls the prelude's helpers
(:mod:`shared.lua_prelude`). A script answers a flat list whose first item says what happened
(``ok``, ``created``, ``existing``, ``duplicate``...) or ``err`` followed by a code and a message,
which :mod:`shared.store` turns into the matching :class:`shared.errors.ApiError`.
"""

from __future__ import annotations

from shared.keys import LOG_MAXLEN
from shared.lua_verification import OBSERVE, VERIFY_RESULT

__all__ = ["OBSERVE", "VERIFY_RESULT"]  # with the scripts below

REGISTER_NODE = r"""
local node_id = ARGV[1]
local name = ARGV[2]
local slots = ARGV[3]
local class = ARGV[4]
local gpu = ARGV[5]
local gpu_memory_mb = ARGV[6]
local ram_mb = ARGV[7]
local capabilities = ARGV[8]
local labels = ARGV[9]
local token_hash = ARGV[10]
local ttl_ms = tonumber(ARGV[11])
local capability = ARGV[12]
local w_rep, w_av, w_cap, w_up = ARGV[13], ARGV[14], ARGV[15], ARGV[16]
local presented_key_hash = ARGV[17]  -- digest of the node_key in the body, '' when none was sent
local new_key_hash = ARGV[18]        -- digest of a fresh node_key, issued if the name is new
local stream_secret_hash = ARGV[19]  -- digest of the password of the node's store user
local mem_job_mb = ARGV[20]    -- the most one job may use here (one GPU's memory, or RAM); 0: not reported
local mem_total_mb = ARGV[21]  -- what all its jobs together may use
local profile = ARGV[22]       -- JSON of what placement checks statically (see NODES_PROFILES)
local device_kind = ARGV[23]   -- 'cpu', or the name of its GPUs: who may replay whose training
-- ARGV[24]: where other nodes reach it (multi-node jobs' rendezvous); not a local: a chunk has 200 at most
local now = now_ms()
reap_expired(now)
if is_banned(name) then
  return fail('node_banned', 'node identity ' .. name .. ' was slashed and may not register again: '
    .. redis.call('HGET', NODES_BANNED, name))
end
-- The name belongs to the identity that first registered it: only its node_key registers it again.
local issued = 0
local owner = redis.call('HGET', NODE_IDENTITIES, name)
if owner then
  if not digest_equal(owner, presented_key_hash) then
    return fail('name_taken', 'node name ' .. name .. ' belongs to another node identity: register it with '
      .. 'its node_key, or choose another name')
  end
elseif presented_key_hash ~= '' then
  redis.call('HSET', NODE_IDENTITIES, name, presented_key_hash)  -- a key the store forgot: adopted
else
  redis.call('HSET', NODE_IDENTITIES, name, new_key_hash)
  issued = 1
end
-- One live registration per identity. A draining one is the same runtime restarted after a SIGTERM:
-- it goes (its jobs were handed back or go back now) and the runtime registers afresh.
local live = redis.call('HGET', NODE_BY_NAME, name)
if live and redis.call('EXISTS', node_key(live)) == 1 then
  if redis.call('HGET', node_key(live), 'status') ~= 'draining' then
    return fail('name_in_use', 'node ' .. live .. ' (' .. name .. ') is still registered; a restarted runtime '
      .. 'resumes it with its saved session, or registers once its heartbeat lapses')
  end
  remove_node(live, now, false)
end
local rep = redis.call('HGET', REPUTATION, name)
if not rep then
  rep = REPUTATION_START
  redis.call('HSET', REPUTATION, name, rep)
end
local nk = node_key(node_id)
redis.call('HSET', nk, 'node_id', node_id, 'name', name, 'status', 'online', 'slots', slots, 'running', 0,
  'class', class, 'gpu', gpu, 'gpu_memory_mb', gpu_memory_mb, 'ram_mb', ram_mb,
  'capabilities', capabilities, 'labels', labels, 'token_hash', token_hash, 'ttl_ms', ttl_ms,
  'reputation', rep, 'capability', capability, 'w_rep', w_rep, 'w_av', w_av, 'w_cap', w_cap, 'w_up', w_up,
  'registered_ms', now, 'alive_since_ms', now, 'last_heartbeat_ms', now, 'health', '',
  'stream_secret_hash', stream_secret_hash, 'mem_job_mb', mem_job_mb, 'mem_total_mb', mem_total_mb,
  'mem_reserved_mb', 0, 'profile', profile, 'device_kind', device_kind, 'kind_counted', '1')
redis.call('HSET', nk, 'address', ARGV[24] or '')  -- apart: one call of the above's size is the most a chunk holds
redis.call('HINCRBY', NODES_PROFILES, profile, 1)
redis.call('HINCRBY', NODES_KINDS, device_kind, 1)
redis.call('ZADD', NODES_LAST_SEEN, now, name)
redis.call('ZADD', NODES_DEADLINE, now + ttl_ms, node_id)
redis.call('HSET', NODE_NAMES, node_id, name)
redis.call('HSET', NODE_BY_NAME, name, node_id)
-- Group from id 0: entries added before the node first reads are still delivered to it.
redis.pcall('XGROUP', 'CREATE', node_stream_key(node_id), NODE_GROUP, '0', 'MKSTREAM')
rescore(node_id, now)
unpark_for(profile)
local assigned = pull_queue(node_id, now)
return {'ok', #assigned, issued}
"""

HEARTBEAT = r"""
local node_id = ARGV[1]
local gpu_free_frac = ARGV[2]
local token_hash = ARGV[3]  -- optional: the caller's session-token digest, checked before any change
local health = ARGV[4] or ''  -- '' when the node reads its stream, else why it cannot (not scheduled then)
if token_hash and token_hash ~= '' and not session_ok(node_id, token_hash) then
  return fail('unauthorized', SESSION_UNKNOWN)
end
local now = now_ms()
reap_expired(now)
local nk = node_key(node_id)
if redis.call('EXISTS', nk) == 0 then
  return fail('not_found', 'node ' .. node_id .. ' is not registered (its heartbeat lapsed?); register again')
end
local ttl_ms = tonumber(redis.call('HGET', nk, 'ttl_ms'))
redis.call('ZADD', NODES_DEADLINE, now + ttl_ms, node_id)
if not redis.call('HGET', nk, 'profile') and redis.call('HGET', nk, 'status') == 'online' then
  -- registered by a version before profiles: count it now
  local f = redis.call('HMGET', nk, 'gpu', 'gpu_memory_mb', 'ram_mb', 'labels')
  local profile = cjson.encode({gpu = tonumber(f[1]) or 0, gpu_mem = tonumber(f[2]) or 0, mem = 0,
    ram = tonumber(f[3]) or 0, labels = cjson.decode(f[4] or '{}')})
  redis.call('HSET', nk, 'profile', profile)
  redis.call('HINCRBY', NODES_PROFILES, profile, 1)
end
redis.call('HSET', nk, 'last_heartbeat_ms', now, 'gpu_free_frac', gpu_free_frac, 'health', health)
rescore(node_id, now)
expire_stale_assignments(node_id, now)
expire_tasks(node_id, now)
local cancels = redis.call('SMEMBERS', node_cancels_key(node_id))
redis.call('DEL', node_cancels_key(node_id))
local assigned = pull_queue(node_id, now)
-- an unhealthy node gets its store user's digest back, so the caller can recreate a lost user
local secret = ''
if health ~= '' then secret = redis.call('HGET', nk, 'stream_secret_hash') or '' end
local reply = {'ok', redis.call('HGET', nk, 'status'), #assigned, secret}
for _, job_id in ipairs(cancels) do table.insert(reply, job_id) end
return reply
"""

DRAIN_NODE = r"""
local node_id = ARGV[1]
local now = now_ms()
local nk = node_key(node_id)
if redis.call('EXISTS', nk) == 0 then
  return fail('not_found', 'no node ' .. node_id)
end
redis.call('HSET', nk, 'status', 'draining')
forget_profile(node_id)
rescore(node_id, now)
if tonumber(redis.call('HGET', nk, 'running')) == 0 then
  remove_node(node_id, now, false)
  return {'ok', 'removed'}
end
return {'ok', 'draining'}
"""

# The reaper timer (every gateway process, every CYXWIZ_REAP_INTERVAL_S): besides reaping, the work no
# request needs done at once: retention (first: its deletes are allowed in a full store, and free it),
# wall-clock limits, and the queue sweep.
REAP = r"""
local now = now_ms()
purge_expired(now)
local reaped = reap_expired(now)
expire_job_deadlines(now)
sweep_queues()
sweep_tasks(now)
return reaped
"""

SUBMIT_JOB = r"""
local job_id = ARGV[1]
local tenant = ARGV[2]
local idem = ARGV[3]
local name = ARGV[4]
local priority = ARGV[5]
local band = tonumber(ARGV[6])
local max_attempts = ARGV[7]
local spec = ARGV[8]
local req_gpu, req_gpu_mem, req_ram, req_labels = ARGV[9], ARGV[10], ARGV[11], ARGV[12]
local memory_mb = ARGV[13]        -- the job's estimated peak memory
local max_duration_ms = ARGV[14]  -- its wall-clock limit from its first start
local max_queued = tonumber(ARGV[15])  -- the settings' default per-tenant limit
local gang = ARGV[16] or '1'  -- requirements.nodes: ranks placed together (docs/distributed.md)
if idem ~= '' then
  local existing = redis.call('GET', idempotency_key(tenant, idem))
  if existing then
    local j = redis.call('HMGET', job_key(existing), 'status', 'node_id')
    return {'existing', existing, j[1], j[2]}
  end
end
local queued = redis.call('ZCARD', jobs_index_key(tenant, 'queued'))
local limit = tenant_limit(tenant, 'max_queued_jobs', max_queued)
if queued >= limit then
  return fail('quota_exceeded', 'tenant ' .. tenant .. ' has ' .. queued .. ' queued jobs, its limit '
    .. '(max_queued_jobs) is ' .. limit .. ': wait for some to start, or cancel some')
end
local now = now_ms()
reap_expired(now)
local seq = redis.call('INCR', JOB_SEQ)
redis.call('HINCRBY', STATS, 'jobs_submitted', 1)
redis.call('HSET', job_key(job_id), 'job_id', job_id, 'name', name, 'tenant', tenant, 'status', 'queued',
  'node_id', '', 'attempt', 1, 'lost_count', 0, 'max_attempts', max_attempts, 'priority', priority,
  'band', band, 'seq', seq, 'spec', spec, 'req_gpu', req_gpu, 'req_gpu_mem', req_gpu_mem,
  'req_ram', req_ram, 'req_labels', req_labels, 'created_ms', now, 'last_seq', -1,
  'artifacts', '[]', 'artifact_bytes', 0, 'progress', '', 'error', '', 'memory_mb', memory_mb,
  'max_duration_ms', max_duration_ms, 'handbacks', 0, 'avoid_node', '', 'gang', gang)
for _, t in ipairs({tenant, false}) do
  redis.call('ZADD', jobs_index_key(t or nil, nil), seq, job_id)
  redis.call('ZADD', jobs_index_key(t or nil, 'queued'), seq, job_id)
end
enqueue(job_id, job_class(req_gpu), tenant, band * PRIORITY_SCALE + seq)
if idem ~= '' then
  redis.call('SET', idempotency_key(tenant, idem), job_id, 'EX', IDEMPOTENCY_TTL_S)
end
local node_id = place_or_park(job_id, now)
if node_id then return {'created', job_id, 'assigned', node_id} end
return {'created', job_id, 'queued', ''}
"""

CANCEL_JOB = r"""
local job_id = ARGV[1]
local tenant = ARGV[2]
local jk = job_key(job_id)
local j = redis.call('HMGET', jk, 'status', 'tenant')
if not j[1] or (tenant ~= '' and j[2] ~= tenant) then
  return fail('not_found', 'no job ' .. job_id)
end
if TERMINAL[j[1]] then return {'terminal', j[1]} end
local now = now_ms()
local node_id = end_job(job_id, 'cancelled', 'cancelled by user', now)
if node_id ~= '' then pull_queue(node_id, now) end
return {'ok', 'cancelled'}
"""

# Fencing shared by progress reports and artifact uploads: the reporting node must be the one that
# holds this attempt, the job must not be cancelled, and the attempt must be the job's current one.
# (Terminal jobs are checked by each caller: a retried final report is a duplicate, not a conflict.)
_FENCE = r"""
-- ``members_ok``: any node of a gang's attempt passes (its rank > 0 reports failures and ships logs);
-- otherwise only the node of rank 0, which reports progress and uploads the results.
local function fence(job_id, node_id, attempt, members_ok)
  local j = redis.call('HMGET', job_key(job_id), 'status', 'attempt', 'node:' .. attempt)
  if not j[1] then return fail('not_found', 'no job ' .. job_id) end
  if j[3] ~= node_id and not (members_ok and GANG.rank(job_id, node_id, attempt)) then
    return fail('forbidden', 'attempt ' .. attempt .. ' of job ' .. job_id .. ' is not assigned to node ' .. node_id)
  end
  if j[1] == 'cancelled' then return fail('job_cancelled', 'job ' .. job_id .. ' was cancelled; stop it') end
  if tonumber(attempt) ~= tonumber(j[2]) then
    return fail('stale_attempt', 'attempt ' .. attempt .. ' of job ' .. job_id .. ' is stale; current is ' .. j[2])
  end
  return nil
end

local function terminal_conflict(job_id, status)
  return fail('job_terminal', 'job ' .. job_id .. ' is already ' .. status)
end
"""

REPORT_PROGRESS = _FENCE + r"""
local job_id = ARGV[1]
local node_id = ARGV[2]
local attempt = ARGV[3]
local seq = tonumber(ARGV[4])
local status = ARGV[5]
local progress = ARGV[6]
local event = ARGV[7]
local error_text = ARGV[8]
local fault = ARGV[9]
local token_hash = ARGV[10]  -- optional: the caller's session-token digest, checked before any change
local commitment = ARGV[11] or ''  -- JSON {step, weights, optimizer, data} of a checkpoint taken, or ''
local draw, draw2 = tonumber(ARGV[12] or '1'), tonumber(ARGV[13] or '0')  -- uniform [0, 1): the audit draw
if token_hash and token_hash ~= '' and not session_ok(node_id, token_hash) then
  return fail('unauthorized', SESSION_UNKNOWN)
end
local refused = fence(job_id, node_id, attempt, true)
if refused then return refused end
local jk = job_key(job_id)
local j = redis.call('HMGET', jk, 'status', 'tenant', 'seq', 'last_seq', 'artifacts', 'held')
local rank = GANG.rank(job_id, node_id, attempt)
if status == 'failed' and fault == 'peer' then
  -- a rank whose collectives broke because another rank went away: not its node's fault. Its slot is
  -- free; the attempt waits for the rank at fault (its own failure report, or its node's reaping), or
  -- fails without blame once every rank has said it lost its peers.
  if TERMINAL[j[1]] then return terminal_conflict(job_id, j[1]) end
  if not redis.call('HGET', jk, 'nodes:' .. attempt) then
    return fail('invalid_field', 'fault "peer" is for multi-node jobs', 'fault')
  end
  local now = now_ms()
  local rk = GANG.rendezvous_key(job_id)
  if redis.call('HSETNX', rk, 'peer:' .. rank, now) == 1 then  -- a retry of the report adds nothing
    -- from the first such report the other ranks have a deadline to end the attempt (expire_rendezvous)
    redis.call('HSETNX', rk, 'peer_since', now)
    redis.call('XADD', job_progress_key(job_id), 'MAXLEN', '~', PROGRESS_MAXLEN, '*', 'event', event)
  end
  if redis.call('SREM', node_jobs_key(node_id), job_id) == 1 then
    free_slot(node_id, tonumber(redis.call('HGET', jk, 'memory_mb') or '0'), now)
  end
  local members = cjson.decode(redis.call('HGET', jk, 'nodes:' .. attempt))
  for r = 0, #members - 1 do
    if redis.call('HEXISTS', rk, 'peer:' .. r) == 0 then
      pull_queue(node_id, now)
      return {'ok', j[1]}
    end
  end
  release(job_id, node_id, now, node_id)
  if requeue(job_id, now, true, 'every rank lost its peers: ' .. error_text) == 'queued' then
    place_or_park(job_id, now)
  end
  pull_queue(node_id, now)
  return {'ok', redis.call('HGET', jk, 'status')}
end
if rank ~= 0 then
  -- a gang's other ranks only ever end the attempt: a failure of their own, or a hand-back
  if status ~= 'failed' and status ~= 'queued' then
    return fail('forbidden', 'rank ' .. rank .. ' of job ' .. job_id .. ' does not report progress; rank 0 does')
  end
  progress, commitment, seq = '', '', tonumber(j[4]) + 1  -- their sequence is not rank 0's
end
if seq <= tonumber(j[4]) then return {'duplicate', j[1]} end
if TERMINAL[j[1]] then return terminal_conflict(job_id, j[1]) end
if j[6] == '1' then
  return fail('job_terminal', 'job ' .. job_id .. ' has finished training; its result is under audit')
end
local final = nil
if status == 'completed' then
  final = redis.call('HGET', jk, 'final:' .. attempt)
  if not final then
    return fail('missing_artifact', 'upload model.safetensors (of this attempt) before reporting completed')
  end
  local last = redis.call('HGET', jk, 'last_state:' .. attempt) or redis.call('HGET', jk, 'start:' .. attempt) or ''
  local before = get_state(job_id, last)
  local step = tonumber(cjson.decode(progress).step) or 0
  if before and step < before.step then
    return fail('invalid_field', 'the completion is at step ' .. step .. ', behind the state attempt ' .. attempt
      .. ' started from or last saved (step ' .. before.step .. ')', 'step')
  end
end
local now = now_ms()
if commitment ~= '' then
  local c = cjson.decode(commitment)
  c.id = 'c' .. attempt .. 's' .. c.step
  c.attempt, c.node_id, c.ms = tonumber(attempt), node_id, now
  if redis.call('HEXISTS', job_states_key(job_id), c.id) == 0 then put_state(job_id, c) end
end
redis.call('HSET', jk, 'last_seq', seq)
if progress ~= '' then redis.call('HSET', jk, 'progress', progress) end
redis.call('XADD', job_progress_key(job_id), 'MAXLEN', '~', PROGRESS_MAXLEN, '*', 'event', event)
local name = redis.call('HGET', NODE_NAMES, node_id)
if status == 'running' then
  if j[1] == 'assigned' then
    set_status(job_id, j[1], 'running', j[2], j[3])
    redis.call('HSET', jk, 'started_ms', now)
    -- the wall-clock limit runs from the job's first start, across attempts
    local limit = tonumber(redis.call('HGET', jk, 'max_duration_ms') or '')
    if limit then redis.call('ZADD', JOBS_DEADLINE, 'NX', now + limit, job_id) end
  end
elseif status == 'completed' then
  -- the final weights join the chain; the result is held while an audit replays a segment of it
  local f = cjson.decode(final)
  local p = cjson.decode(progress)
  f.id, f.final, f.step, f.epoch = 'a' .. attempt .. 'final', true, tonumber(p.step) or 0, tonumber(p.epoch) or 0
  f.artifact = 'model.safetensors'
  record_state(job_id, attempt, node_id, f, now)  -- its step was checked above
  redis.call('HSET', jk, 'final_state', f.id)
  release(job_id, node_id, now, node_id)
  local audit = begin_audit(job_id, now, draw, draw2)
  if j[1] == 'assigned' then set_status(job_id, j[1], 'running', j[2], j[3]) end
  if audit == 'pending' then
    redis.call('HSET', jk, 'held', '1')
    redis.call('ZREM', JOBS_DEADLINE, job_id)
  elseif audit == 'rerun' then
    rerun(job_id, now, 'its training rested on work of a node caught lying; trained again')
  else
    set_status(job_id, 'running', 'completed', j[2], j[3])
    redis.call('HSET', jk, 'finished_ms', now)
    adjust_reputation(node_id, name, 'success', now)
  end
  pull_queue(node_id, now)
elseif status == 'failed' and fault == 'node' then
  release(job_id, node_id, now, node_id)
  -- The same failure on a second node is the job's: it fails, and the first node's charge is taken back.
  -- Failures compare with ids and numbers blanked out.
  local signature = string.lower(string.sub(error_text, 1, 300)):gsub('[nj]%-%x+', '?'):gsub('%d+', '#')
  local before = redis.call('HMGET', jk, 'fault_signature', 'fault_node', 'fault_node_id')
  if before[1] == signature and name and before[2] ~= name then
    set_status(job_id, j[1], 'failed', j[2], j[3])
    redis.call('HSET', jk, 'finished_ms', now, 'error', error_text .. ' (the same failure on two nodes, '
      .. before[2] .. ' and ' .. name .. ': the job\'s fault; no node is charged)')
    adjust_reputation(before[3], before[2], 'refund', now)
  else
    redis.call('HSET', jk, 'fault_signature', signature, 'fault_node', name or '', 'fault_node_id', node_id)
    avoid(job_id, {node_id}, now)
    adjust_reputation(node_id, name, 'node_fault', now)
    if requeue(job_id, now, true, error_text) == 'queued' then place_or_park(job_id, now) end
  end
  pull_queue(node_id, now)
elseif status == 'failed' then
  set_status(job_id, j[1], 'failed', j[2], j[3])
  redis.call('HSET', jk, 'finished_ms', now, 'error', error_text)
  release(job_id, node_id, now, node_id)
  pull_queue(node_id, now)
elseif status == 'queued' then
  -- A hand-back: never straight back onto the same node, and past MAX_HANDBACKS each one costs an attempt.
  release(job_id, node_id, now, node_id)
  local handbacks = redis.call('HINCRBY', jk, 'handbacks', 1)
  avoid(job_id, {node_id}, now)
  local reason = 'handed back ' .. handbacks .. ' times (more than ' .. MAX_HANDBACKS .. ' count as lost attempts)'
  if requeue(job_id, now, handbacks > MAX_HANDBACKS, reason) == 'queued' then place_or_park(job_id, now) end
end
return {'ok', redis.call('HGET', jk, 'status')}
"""

COMMIT_ARTIFACT = _FENCE + r"""
local upload_key = KEYS[1]
local artifact_key = KEYS[2]
local job_id = ARGV[1]
local node_id = ARGV[2]
local attempt = ARGV[3]
local name = ARGV[4]
local size = tonumber(ARGV[5])
local max_job_bytes = tonumber(ARGV[6])
local upload_id = ARGV[7]
local kind = ARGV[8] or ''        -- 'checkpoint', 'weights' or '' (any other artifact)
local state_json = ARGV[9] or ''  -- for those two: what the gateway read of the file (digests, position)
local draw = tonumber(ARGV[10] or '0')
if not holds_upload(job_id, name, upload_id) then
  redis.call('DEL', upload_key)
  return fail('upload_replaced', 'a newer upload of ' .. name .. ' for job ' .. job_id .. ' replaced this one')
end
redis.call('HDEL', job_uploads_key(job_id), name)
local refused = fence(job_id, node_id, attempt)
if refused then
  redis.call('DEL', upload_key)
  return refused
end
local jk = job_key(job_id)
local status = redis.call('HGET', jk, 'status')
if TERMINAL[status] then
  redis.call('DEL', upload_key)
  return terminal_conflict(job_id, status)
end
local old = tonumber(redis.call('HGET', artifact_key, 'size') or '0')
local total = tonumber(redis.call('HGET', jk, 'artifact_bytes')) - old + size
if total > max_job_bytes then
  redis.call('DEL', upload_key)
  return fail('payload_too_large', 'artifacts of job ' .. job_id .. ' would exceed ' .. max_job_bytes .. ' bytes')
end
local now = now_ms()
local state = nil
if kind == 'checkpoint' then
  state = cjson.decode(state_json)
  state.id = 'a' .. attempt .. 's' .. state.step
  local c = get_state(job_id, 'c' .. attempt .. 's' .. state.step)
  if c and (c.weights ~= state.weights or ((c.optimizer or '') ~= '' and c.optimizer ~= state.optimizer)) then
    redis.call('DEL', upload_key)
    return fail('invalid_artifact', 'the checkpoint at step ' .. state.step
      .. ' does not match the digests this attempt committed to for that step')
  end
  state.artifact = checkpoint_artifact_name(attempt, state.step)
  local why = record_state(job_id, attempt, node_id, state, now)
  if why then
    redis.call('DEL', upload_key)
    return fail('invalid_artifact', 'the checkpoint cannot be resumed from: ' .. why)
  end
elseif kind == 'weights' then
  local w = cjson.decode(state_json)
  w.ms = now
  redis.call('HSET', jk, 'final:' .. attempt, cjson.encode(w))
end
redis.call('RENAME', upload_key, artifact_key)
redis.call('PERSIST', artifact_key)
if state then
  redis.call('HSET', jk, 'resume_state', state.id)
  local kept = cjson.decode(redis.call('HGET', jk, 'checkpoints') or '[]')
  local known = false
  for _, id in ipairs(kept) do if id == state.id then known = true end end
  if not known then table.insert(kept, state.id) end
  redis.call('HSET', jk, 'checkpoints', cjson.encode(kept), 'artifact_bytes', total)
  trim_checkpoints(job_id, draw)
  total = tonumber(redis.call('HGET', jk, 'artifact_bytes'))
end
local names = cjson.decode(redis.call('HGET', jk, 'artifacts'))
local known = false
for _, n in ipairs(names) do if n == name then known = true end end
if not known then table.insert(names, name) end
redis.call('HSET', jk, 'artifacts', cjson.encode(names), 'artifact_bytes', total)
return {'ok'}
"""

# Before an upload streams its body: the same fence as COMMIT_ARTIFACT (a node cannot park bytes in Redis
# for a job it does not hold), one upload per (job, name) at a time (a newer one replaces an older), a
# cap on artifacts per job, and the upload's declared size reserved against the job's cap, so parallel
# uploads cannot overshoot it.
# A reservation lapses at its expiry (a gateway that died mid-upload) or when COMMIT_ARTIFACT or
# END_UPLOAD drops it.
CHECK_UPLOAD = _FENCE + r"""
local job_id = ARGV[1]
local node_id = ARGV[2]
local attempt = ARGV[3]
local name = ARGV[4]
local upload_id = ARGV[5]
local size = tonumber(ARGV[6])           -- declared (Content-Length), else the per-artifact cap
local max_job_bytes = tonumber(ARGV[7])
local max_artifacts = tonumber(ARGV[8])
local ttl_ms = tonumber(ARGV[9])
local refused = fence(job_id, node_id, attempt)
if refused then return refused end
local jk = job_key(job_id)
local j = redis.call('HMGET', jk, 'status', 'artifacts', 'artifact_bytes')
if TERMINAL[j[1]] then return terminal_conflict(job_id, j[1]) end
local now = now_ms()
local uk = job_uploads_key(job_id)
local names = {}
for _, n in ipairs(cjson.decode(j[2])) do names[n] = true end
local count, reserved = #cjson.decode(j[2]), 0
local entries = redis.call('HGETALL', uk)
for i = 1, #entries, 2 do
  local _, bytes, expiry = string.match(entries[i + 1], '^([^|]*)|(%d+)|(%d+)$')
  if not expiry or tonumber(expiry) < now then
    redis.call('HDEL', uk, entries[i])
  elseif entries[i] == name then
    -- the same name again: a retry (its first try's connection dropped). The newer upload replaces the
    -- older, which stops at its next chunk and cannot commit: one upload per (job, name) at a time.
  else
    reserved = reserved + tonumber(bytes)
    if not names[entries[i]] then count = count + 1 end
  end
end
if not names[name] and count >= max_artifacts then
  return fail('payload_too_large', 'job ' .. job_id .. ' may have at most ' .. max_artifacts .. ' artifacts')
end
local old = tonumber(redis.call('HGET', artifact_key(job_id, name), 'size') or '0')
if tonumber(j[3]) - old + reserved + size > max_job_bytes then
  return fail('payload_too_large', 'artifacts of job ' .. job_id .. ' would exceed ' .. max_job_bytes
    .. ' bytes (with the uploads in progress)')
end
redis.call('HSET', uk, name, upload_id .. '|' .. string.format('%d', size) .. '|' .. string.format('%d', now + ttl_ms))
redis.call('PEXPIRE', uk, ttl_ms)
return {'ok'}
"""

# An upload that failed: drop its reservation (only its own: a later upload of the name keeps its).
END_UPLOAD = r"""
local job_id = ARGV[1]
local name = ARGV[2]
local upload_id = ARGV[3]
if holds_upload(job_id, name, upload_id) then redis.call('HDEL', job_uploads_key(job_id), name) end
return {'ok'}
"""

# A node's log lines of one attempt (the job process's output and the training loop's own lines), fenced
# like progress reports. Lines still land once the job ended for the attempt that held it last, so the
# traceback of the failure that ended a job gets in: a job that failed (or completed) keeps its attempt,
# and one that failed as its last attempt was lost moved on to an attempt no node ever held.
APPEND_LOGS = _FENCE + f"local LOG_MAXLEN = {LOG_MAXLEN}\n" + r"""
local job_id = ARGV[1]
local node_id = ARGV[2]
local attempt = ARGV[3]
local token_hash = ARGV[4]  -- optional: the caller's session-token digest, checked before any change
local first_line = 5        -- ARGV[5], ARGV[6], ...: time and text of each line, oldest first
if token_hash ~= '' and not session_ok(node_id, token_hash) then
  return fail('unauthorized', SESSION_UNKNOWN)
end
local refused = fence(job_id, node_id, attempt, true)
if refused and refused[2] == 'stale_attempt' then
  local j = redis.call('HMGET', job_key(job_id), 'status', 'attempt')
  local current = tonumber(j[2])
  if TERMINAL[j[1]] and tonumber(attempt) == current - 1
      and redis.call('HEXISTS', job_key(job_id), 'node:' .. current) == 0 then
    refused = nil  -- the attempt that held the job last: the job ended with it
  end
end
if refused then return refused end
local key = job_logs_key(job_id, attempt)
local added = 0
for i = first_line, #ARGV - 1, 2 do
  redis.call('XADD', key, 'MAXLEN', '~', LOG_MAXLEN, '*', 'time', ARGV[i], 'line', ARGV[i + 1])
  added = added + 1
end
return {'ok', added}
"""

# A gang's rendezvous (docs/distributed.md): a rank of the current attempt says it arrived (rank 0 with the
# port of its c10d store, which is published as its node's registered address and that port) or that it is
# ready (its process group formed; rank 0 only once it published its store). Answers the state: master
# ("host:port" or ""), world size, the ranks arrived and ready. The first call of each kind counts: rank 0
# retrying its publication with the same port is answered as the first time, another port is refused (the
# other ranks may be connecting to the first). The deadline is expire_rendezvous's.
RENDEZVOUS = _FENCE + r"""
local job_id = ARGV[1]
local node_id = ARGV[2]
local attempt = ARGV[3]
local rank = tonumber(ARGV[4])
local port = ARGV[5]       -- rank 0: its store's port; else ''
local ready = ARGV[6]      -- '1': this rank's process group formed
local token_hash = ARGV[7]
local write = ARGV[8] == '1'  -- '0': only read the state
if token_hash ~= '' and not session_ok(node_id, token_hash) then
  return fail('unauthorized', SESSION_UNKNOWN)
end
local refused = fence(job_id, node_id, attempt, true)
if refused then return refused end
local jk = job_key(job_id)
local members = redis.call('HGET', jk, 'nodes:' .. attempt)
if not members then return fail('invalid_field', 'job ' .. job_id .. ' is not a multi-node job', 'attempt') end
members = cjson.decode(members)
local held = GANG.rank(job_id, node_id, attempt)
if rank ~= held then
  return fail('forbidden', 'node ' .. node_id .. ' is rank ' .. held .. ' of attempt ' .. attempt .. ', not rank '
    .. tostring(rank))
end
local status = redis.call('HGET', jk, 'status')
if TERMINAL[status] then return terminal_conflict(job_id, status) end
local rk = GANG.rendezvous_key(job_id)
if redis.call('HGET', rk, 'attempt') ~= attempt then
  return fail('stale_attempt', 'the rendezvous of job ' .. job_id .. ' is not for attempt ' .. attempt)
end
local now = now_ms()
if write then
  if port ~= '' then
    if rank ~= 0 then return fail('invalid_field', 'only rank 0 publishes the store address', 'port') end
    local address = redis.call('HGET', node_key(node_id), 'address') or ''
    if address == '' then return fail('invalid_field', 'node ' .. node_id .. ' registered no address', 'port') end
    if string.find(address, ':', 1, true) then address = '[' .. address .. ']' end  -- IPv6
    local master = address .. ':' .. port
    if redis.call('HSETNX', rk, 'master', master) == 0 and redis.call('HGET', rk, 'master') ~= master then
      return fail('conflict', 'rank 0 of attempt ' .. attempt .. ' published its store at '
        .. redis.call('HGET', rk, 'master') .. ' already')
    end
  elseif rank == 0 and ready == '1' and redis.call('HEXISTS', rk, 'master') == 0 then
    return fail('conflict', 'rank 0 publishes its store (port) before it is ready')
  end
  redis.call('HSETNX', rk, 'arrived:' .. rank, now)
  if ready == '1' then
    redis.call('HSETNX', rk, 'ready:' .. rank, now)
    local all = true
    for r = 0, #members - 1 do
      if redis.call('HEXISTS', rk, 'ready:' .. r) == 0 then all = false end
    end
    if all then redis.call('HSETNX', rk, 'complete', now) end
  end
end
local arrived, ready_ranks = {}, {}
for r = 0, #members - 1 do
  if redis.call('HEXISTS', rk, 'arrived:' .. r) == 1 then table.insert(arrived, r) end
  if redis.call('HEXISTS', rk, 'ready:' .. r) == 1 then table.insert(ready_ranks, r) end
end
local function list(t) if #t == 0 then return '[]' end return cjson.encode(t) end
return {'ok', redis.call('HGET', rk, 'master') or '', #members, list(arrived), list(ready_ranks), cjson.encode(members)}
"""
