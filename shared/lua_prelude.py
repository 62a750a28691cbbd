"""Lua helpers shared by every script: key builders, the transition table, scoring, placement,
release, requeue and reaping.

Each script in :mod:`shared.lua` is this prelude followed by its own body, so a helper such as
``assign`` exists once and every caller moves a job the same way. All times are the Redis server's
clock (``TIME``), so function processes on different hosts agree.
"""

from __future__ import annotations

from shared.keys import LUA_KEY_BUILDERS
from shared.lua_verification import AUDIT_EVERY_MS, RECHECK_MAX, TASK_SCAN, VERIFY_HELPERS
from shared.resources import TORCH_MB
from shared.settings import Settings
from shared.transitions import LUA_TRANSITIONS, PRIORITY_SCALE, TERMINAL

_HELPERS = r"""
-- defined with the verification helpers (shared.lua_verification), used before them
local on_probation, pull_tasks, drop_node_tasks, start_state, place_task, expire_tasks, sweep_tasks

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fail(code, message)
  return {'err', code, message}
end

-- Are two digests equal? Every byte is compared (constant time), as hmac.compare_digest does.
local function digest_equal(stored, given)
  if not stored or not given or #stored ~= #given then return false end
  local diff = 0
  for i = 1, #stored do diff = bit.bor(diff, bit.bxor(string.byte(stored, i), string.byte(given, i))) end
  return diff == 0
end

-- Does this digest match the node's stored session-token digest? Lets a node call authenticate
-- inside its one script.
local function session_ok(node_id, token_hash)
  return digest_equal(redis.call('HGET', node_key(node_id), 'token_hash'), token_hash)
end

local SESSION_UNKNOWN = "unknown node session token (if the node's heartbeat lapsed, register again)"

-- Move a job between statuses: the only place a status changes. Keeps the listing indexes in step,
-- the retention and wall-clock bookkeeping of jobs that end, and the slots a tenant's gangs hold
-- beyond one per job (``gang_extra_slots`` on the tenant's hash: a gang of N holds N).
local function set_status(job_id, from, to, tenant, seq)
  if not TRANSITIONS[from] or not TRANSITIONS[from][to] then
    -- stop the script here (callers change a status before anything else they write)
    error('illegal transition ' .. tostring(from) .. ' -> ' .. to .. ' for ' .. job_id)
  end
  redis.call('HSET', job_key(job_id), 'status', to)
  redis.call('ZREM', jobs_index_key(tenant, from), job_id)
  redis.call('ZREM', jobs_index_key(nil, from), job_id)
  redis.call('ZADD', jobs_index_key(tenant, to), seq, job_id)
  redis.call('ZADD', jobs_index_key(nil, to), seq, job_id)
  if TERMINAL[from] then redis.call('ZREM', JOBS_FINISHED, job_id) end  -- an audit re-runs a completed job
  local holds = to == 'assigned' or to == 'running'  -- node slots, counted by the tenant's running limit
  if holds ~= (from == 'assigned' or from == 'running') then
    local extra = (tonumber(redis.call('HGET', job_key(job_id), 'gang') or '1') or 1) - 1
    if extra > 0 and holds then
      redis.call('HINCRBY', tenant_key(tenant), 'gang_extra_slots', extra)
    elseif extra > 0 and tonumber(redis.call('HINCRBY', tenant_key(tenant), 'gang_extra_slots', -extra)) < 0 then
      redis.call('HSET', tenant_key(tenant), 'gang_extra_slots', 0)  -- a gang placed before this was counted
    end
  end
  if TERMINAL[to] then
    redis.call('HINCRBY', STATS, 'jobs_finished:' .. to, 1)
    redis.call('ZADD', JOBS_FINISHED, now_ms(), job_id)
    redis.call('ZREM', JOBS_DEADLINE, job_id)
    redis.call('ZREM', QUEUE_PARKED, job_id)
  end
end

-- --- tenants -------------------------------------------------------------------------------
local function tenant_limit(tenant, field, default)
  return tonumber(redis.call('HGET', tenant_key(tenant), field) or default)
end

-- node slots the tenant's jobs hold (assigned or running): one per job, a gang's one per node
local function tenant_running(tenant)
  return redis.call('ZCARD', jobs_index_key(tenant, 'assigned'))
    + redis.call('ZCARD', jobs_index_key(tenant, 'running'))
    + tonumber(redis.call('HGET', tenant_key(tenant), 'gang_extra_slots') or '0')
end

-- Would ``need`` more slots (1, or a gang's size) take the tenant past its running limit?
local function tenant_at_running_limit(tenant, need)
  return tenant_running(tenant) + (need or 1) > tenant_limit(tenant, 'max_running_jobs', MAX_RUNNING_JOBS)
end

-- --- queues: one per class for counts, one per (class, tenant) that nodes pull from, and the parked set
local function refresh_tenant_head(class, tenant)
  local head = redis.call('ZRANGE', tenant_queue_key(class, tenant), 0, 0, 'WITHSCORES')
  if #head == 0 then
    redis.call('ZREM', queue_tenants_key(class), tenant)
  else
    redis.call('ZADD', queue_tenants_key(class), head[2], tenant)
  end
end

local function enqueue(job_id, class, tenant, score)
  redis.call('ZREM', QUEUE_PARKED, job_id)
  redis.call('ZADD', queue_key(class), score, job_id)
  redis.call('ZADD', tenant_queue_key(class, tenant), score, job_id)
  refresh_tenant_head(class, tenant)
  if tonumber(redis.call('HGET', job_key(job_id), 'gang') or '1') > 1 then
    redis.call('ZADD', GANG.QUEUE, score, job_id)
  end
end

-- Out of the queues (placed, cancelled, failed or parked).
local function dequeue(job_id, class, tenant)
  redis.call('ZREM', queue_key(class), job_id)
  if redis.call('ZREM', tenant_queue_key(class, tenant), job_id) == 1 then refresh_tenant_head(class, tenant) end
  redis.call('ZREM', QUEUE_PARKED, job_id)
  redis.call('ZREM', GANG.QUEUE, job_id)
end

-- Recompute a node's availability, uptime and score, and its place on the boards.
local function rescore(node_id, now)
  local nk = node_key(node_id)
  local f = redis.call('HMGET', nk, 'slots', 'running', 'reputation', 'capability', 'alive_since_ms',
    'w_rep', 'w_av', 'w_cap', 'w_up', 'status', 'class', 'name', 'gpu_free_frac', 'health', 'mem_total_mb',
    'mem_reserved_mb')
  if not f[1] then return end
  local slots, running = tonumber(f[1]), tonumber(f[2])
  local avail = 0
  if slots > 0 then avail = math.max(0, slots - running) / slots end
  if f[13] and f[13] ~= '' then avail = (avail + tonumber(f[13])) / 2 end
  local uptime = math.min(1, math.max(0, now - tonumber(f[5])) / 86400000)
  -- capability: what audits observed of this identity, not what it claims; unproven claims count for
  -- nothing while it is on probation
  local capability = tonumber(f[4])
  local observed = redis.call('HGET', NODES_OBSERVED, f[12])
  if observed then capability = tonumber(observed)
  elseif on_probation(f[12]) then capability = 0 end
  local score = tonumber(f[6]) * tonumber(f[3]) + tonumber(f[7]) * avail
    + tonumber(f[8]) * capability + tonumber(f[9]) * uptime
  redis.call('HSET', nk, 'availability', tostring(avail), 'uptime', tostring(uptime), 'score', tostring(score),
    'capability_used', tostring(capability))
  redis.call('ZADD', NODES_SCORE, score, node_id)
  local cool_until = tonumber(redis.call('HGET', COOLOFF, f[12]) or '0')
  -- memory left for even the smallest job (a node that reports none is not checked)
  local total = tonumber(f[15] or '0')
  local memory_left = total == 0 or total - tonumber(f[16] or '0') >= MIN_JOB_MEMORY_MB
  if f[10] == 'online' and (f[14] or '') == '' and running < slots and cool_until <= now and memory_left then
    redis.call('ZADD', nodes_free_key(f[11]), score, node_id)
  else
    redis.call('ZREM', nodes_free_key(f[11]), node_id)
  end
end

-- Move a node's reputation (by name, so it survives re-registration); cool it off below the floor.
local function adjust_reputation(node_id, name, outcome, now)
  if not name then return end
  local rep = tonumber(redis.call('HGET', REPUTATION, name) or REPUTATION_START)
  if outcome == 'success' then rep = rep + 0.05 * (1 - rep)
  elseif outcome == 'node_fault' then rep = rep * 0.8
  elseif outcome == 'lapsed' then rep = rep * 0.95
  elseif outcome == 'refund' then rep = math.min(1, rep / 0.8) end  -- a node_fault charge taken back
  redis.call('HSET', REPUTATION, name, tostring(rep))
  if rep < REPUTATION_FLOOR then
    redis.call('HSET', COOLOFF, name, now + COOLOFF_MS)
  elseif outcome == 'refund' then
    redis.call('HDEL', COOLOFF, name)
  end
  if not node_id or redis.call('EXISTS', node_key(node_id)) == 0 then
    node_id = redis.call('HGET', NODE_BY_NAME, name)  -- the name's registration now, if another
  end
  if node_id and redis.call('EXISTS', node_key(node_id)) == 1 then
    redis.call('HSET', node_key(node_id), 'reputation', tostring(rep))
    rescore(node_id, now)
  end
end

-- A job's needs: {req_gpu, req_gpu_mem, req_ram, req_labels, memory_mb, avoid_node, avoid_until_ms, gang},
-- then its tenant and status (read in the same call: placement needs them too).
local function job_requirements(job_id)
  return redis.call('HMGET', job_key(job_id), 'req_gpu', 'req_gpu_mem', 'req_ram', 'req_labels', 'memory_mb',
    'avoid_node', 'avoid_until_ms', 'gang', 'tenant', 'status')
end

-- How many nodes a job trains on at once (requirements.nodes): 1, or a gang's size.
function GANG.size(r)
  return tonumber(r[8] or '1') or 1
end

-- Is this upload still the one reserved for the artifact name (a newer one replaces it)?
local function holds_upload(job_id, name, upload_id)
  local entry = redis.call('HGET', job_uploads_key(job_id), name)
  return entry ~= false and string.sub(entry, 1, #upload_id + 1) == upload_id .. '|'
end

-- The nodes that last failed or handed back a job (for a gang, every rank that did not show up) do not get
-- it again for AVOID_MS while other live nodes could hold it without them: other nodes first (see
-- node_can_take). ``nodes``: their ids, kept space-separated in avoid_node.
local function avoid(job_id, nodes, now)
  redis.call('HSET', job_key(job_id), 'avoid_node', table.concat(nodes, ' '), 'avoid_until_ms', now + AVOID_MS)
end

local function labels_match(want_json, have_json)
  if want_json == '{}' then return true end
  local want, have = cjson.decode(want_json), cjson.decode(have_json)
  for k, v in pairs(want) do
    if have[k] ~= v then return false end
  end
  return true
end

-- Could a node of this profile ever hold the job (free or not)? p: decoded profile; mem 0 = not reported.
local function fits_profile(r, p)
  if r[1] == '1' and p.gpu ~= 1 then return false end
  if tonumber(r[2]) > p.gpu_mem or tonumber(r[3]) > p.ram then return false end
  if p.mem > 0 and tonumber(r[5] or '0') > p.mem then return false end
  return labels_match(r[4], cjson.encode(p.labels))
end

-- How many live nodes could hold the job (one check per distinct node profile, not per node), of any
-- class or only of ``class``? Counting stops at ``enough``.
local function fitting_nodes(r, enough, class)
  local profiles, count = redis.call('HGETALL', NODES_PROFILES), 0
  for i = 1, #profiles, 2 do
    local p = cjson.decode(profiles[i])
    if (not class or (p.gpu == 1) == (class == 'gpu')) and fits_profile(r, p) then
      count = count + tonumber(profiles[i + 1])
      if count >= enough then return count end
    end
  end
  return count
end

-- Could live nodes hold the job: one that fits or, for a gang, as many distinct ones as it has ranks, all
-- of one class (GANG.place takes a gang's nodes from one class)?
local function fits_some_node(r)
  local size = GANG.size(r)
  if size == 1 then return fitting_nodes(r, 1) >= 1 end
  for _, class in ipairs(NODE_CLASSES) do
    if fitting_nodes(r, size, class) >= size then return true end
  end
  return false
end

-- Has this node room for one more job or verification task needing ``memory`` MiB now: online and healthy,
-- a free slot (one piece of work at a time while on probation), its deadline not passed, not cooling off,
-- and that much memory left? ``n`` starts with the node's status, slots, running, name, health, mem_job_mb,
-- mem_total_mb, mem_reserved_mb (callers HMGET these first, then what else they check).
local function node_has_room(node_id, n, memory, now)
  local running = tonumber(n[3])
  if n[1] ~= 'online' or (n[5] or '') ~= '' or running >= tonumber(n[2]) then return false end
  -- a new identity takes one job at a time until it has passed its probation audits
  if running >= 1 and on_probation(n[4]) then return false end
  -- lapsed, not yet reaped (or silent through an outage and not back yet): no new work
  if tonumber(redis.call('ZSCORE', NODES_DEADLINE, node_id) or '0') < now then return false end
  if tonumber(redis.call('HGET', COOLOFF, n[4]) or '0') > now then return false end
  local per_job = tonumber(n[6] or '0')
  if memory > 0 and per_job > 0 then
    if memory > per_job or tonumber(n[8] or '0') + memory > tonumber(n[7]) then return false end
  end
  return true
end

-- Can this node take this job now?
local function node_can_take(node_id, r, now)
  local n = redis.call('HMGET', node_key(node_id), 'status', 'slots', 'running', 'name', 'health', 'mem_job_mb',
    'mem_total_mb', 'mem_reserved_mb', 'gpu', 'gpu_memory_mb', 'ram_mb', 'labels', 'class')
  if not n[1] then
    for _, class in ipairs(NODE_CLASSES) do redis.call('ZREM', nodes_free_key(class), node_id) end
    return false
  end
  if not node_has_room(node_id, n, tonumber(r[5] or '0'), now) then return false end
  if r[1] == '1' and n[9] ~= '1' then return false end
  if tonumber(r[2]) > tonumber(n[10]) then return false end
  if tonumber(r[3]) > tonumber(n[11]) then return false end
  if not labels_match(r[4], n[12]) then return false end
  -- see avoid(): other nodes first while enough others could hold the job without the avoided ones (a job
  -- needs one, a gang its size of one class); a job that needs every node that fits it runs there again
  if (r[6] or '') ~= '' and tonumber(r[7] or '0') > now
      and string.find(' ' .. r[6] .. ' ', ' ' .. node_id .. ' ', 1, true) then
    local size, class = GANG.size(r), nil
    if size > 1 then class = n[13] end
    local enough = size + select(2, string.gsub(r[6], '%S+', ''))
    if fitting_nodes(r, enough, class) >= enough then return false end
  end
  return true
end

-- Is this node held for a waiting gang other than ``job_id`` (nil: held for any gang)? It is while the gang
-- that reserves (GANG.reserving) could use it. The one check of the reservation: single-node placement,
-- gangs, pulls and verification tasks all ask it. ``held``: GANG.reserving's answer as {id, requirements},
-- when the caller looks at many nodes at one moment; else it is read here.
function GANG.reserved_for_other(node_id, job_id, now, held)
  held = held or {GANG.reserving(now)}
  return held[1] ~= nil and held[1] ~= job_id and node_can_take(node_id, held[2], now)
end

-- Give a queued job to a node: status, slot, memory, the node's job set, and the node's stream entry.
local function assign(job_id, node_id, now)
  local jk = job_key(job_id)
  local j = redis.call('HMGET', jk, 'status', 'attempt', 'spec', 'tenant', 'seq', 'req_gpu', 'memory_mb')
  set_status(job_id, j[1], 'assigned', j[4], j[5])
  redis.call('HSET', jk, 'node_id', node_id, 'assigned_ms', now, 'node:' .. j[2], node_id, 'last_seq', -1,
    'assigned_ms:' .. j[2], now, 'node_name:' .. j[2], redis.call('HGET', NODE_NAMES, node_id) or '',
    'start:' .. j[2], start_state(job_id))
  dequeue(job_id, job_class(j[6]), j[4])
  redis.call('HINCRBY', node_key(node_id), 'running', 1)
  redis.call('HINCRBY', node_key(node_id), 'mem_reserved_mb', tonumber(j[7] or '0'))
  redis.call('SADD', node_jobs_key(node_id), job_id)
  redis.call('XADD', node_stream_key(node_id), 'MAXLEN', '~', NODE_STREAM_MAXLEN, '*',
    'job_id', job_id, 'attempt', j[2], 'spec', j[3], 'memory_mb', j[7] or '0')
  rescore(node_id, now)
end

-- Give a queued gang its nodes, all at once (rank order = the order given): every member a slot and the
-- job's memory estimate, the job in each member's job set, and on each member's stream an entry with its
-- rank and the world size. The job's node_id (and node:{attempt}, which fences uploads and completion) is
-- rank 0's; nodes:{attempt} lists all. The rendezvous of the attempt starts empty.
function GANG.assign(job_id, members, now)
  local jk = job_key(job_id)
  local j = redis.call('HMGET', jk, 'status', 'attempt', 'spec', 'tenant', 'seq', 'req_gpu', 'memory_mb')
  set_status(job_id, j[1], 'assigned', j[4], j[5])
  redis.call('HSET', jk, 'node_id', members[1], 'assigned_ms', now, 'node:' .. j[2], members[1], 'last_seq', -1,
    'assigned_ms:' .. j[2], now, 'node_name:' .. j[2], redis.call('HGET', NODE_NAMES, members[1]) or '',
    'start:' .. j[2], start_state(job_id), 'nodes:' .. j[2], cjson.encode(members))
  dequeue(job_id, job_class(j[6]), j[4])
  redis.call('DEL', GANG.rendezvous_key(job_id))
  redis.call('HSET', GANG.rendezvous_key(job_id), 'attempt', j[2], 'started_ms', now)
  for rank, node_id in ipairs(members) do
    redis.call('HINCRBY', node_key(node_id), 'running', 1)
    redis.call('HINCRBY', node_key(node_id), 'mem_reserved_mb', tonumber(j[7] or '0'))
    redis.call('SADD', node_jobs_key(node_id), job_id)
    redis.call('XADD', node_stream_key(node_id), 'MAXLEN', '~', NODE_STREAM_MAXLEN, '*',
      'job_id', job_id, 'attempt', j[2], 'spec', j[3], 'memory_mb', j[7] or '0',
      'rank', rank - 1, 'world_size', #members)
    rescore(node_id, now)
  end
end

-- N distinct free nodes for a gang, all of one class (the top SCHEDULE_SCAN of it, best score first;
-- CPU gangs try the CPU class first), none held for another gang, or nothing: a gang never holds part
-- of what it needs. A class with fewer free nodes than the gang's size is not looked at.
function GANG.place(job_id, r, now)
  local size = GANG.size(r)
  local classes = NODE_CLASSES
  if r[1] == '1' then classes = {'gpu'} end
  local held = nil
  for _, class in ipairs(classes) do
    if redis.call('ZCARD', nodes_free_key(class)) >= size then
      held = held or {GANG.reserving(now)}
      local members = {}
      for _, node_id in ipairs(redis.call('ZREVRANGE', nodes_free_key(class), 0, SCHEDULE_SCAN - 1)) do
        if node_can_take(node_id, r, now) and not GANG.reserved_for_other(node_id, job_id, now, held) then
          table.insert(members, node_id)
          if #members == size then
            GANG.assign(job_id, members, now)
            return members[1]
          end
        end
      end
    end
  end
  return false
end

-- The gang that reserves free nodes now: its id and requirements, or nil: the first queued gang (tenants at
-- their running limit aside) once it has waited GANG.RESERVE_MS. A node it could use takes no other work
-- (GANG.reserved_for_other) until the gang has all its nodes, so a big gang is not starved by small jobs or
-- smaller gangs forever.
function GANG.reserving(now)
  for _, job_id in ipairs(redis.call('ZRANGE', GANG.QUEUE, 0, GANG.SCAN - 1)) do
    local j = redis.call('HMGET', job_key(job_id), 'status', 'tenant', 'queued_ms', 'created_ms', 'gang')
    if j[1] == 'queued' and not tenant_at_running_limit(j[2], tonumber(j[5] or '1')) then
      if now - tonumber(j[3] or j[4] or now) >= GANG.RESERVE_MS then return job_id, job_requirements(job_id) end
      return nil
    end
  end
  return nil
end

-- Best node for a job: the top SCHEDULE_SCAN free nodes of each class it may use, best score first.
-- CPU jobs try CPU nodes first so GPUs stay free for GPU work. A tenant at its running limit waits.
-- A gang takes all its nodes at once, or none.
local function place(job_id, now)
  local r = job_requirements(job_id)
  if tenant_at_running_limit(r[9], GANG.size(r)) then return false end
  if GANG.size(r) > 1 then return GANG.place(job_id, r, now) end
  local held = {GANG.reserving(now)}
  local classes = NODE_CLASSES
  if r[1] == '1' then classes = {'gpu'} end
  for _, class in ipairs(classes) do
    local ids = redis.call('ZREVRANGE', nodes_free_key(class), 0, SCHEDULE_SCAN - 1)
    for _, node_id in ipairs(ids) do
      if node_can_take(node_id, r, now) and not GANG.reserved_for_other(node_id, job_id, now, held) then
        assign(job_id, node_id, now)
        return node_id
      end
    end
  end
  return false
end

-- Where a queued job belongs: its class, its tenant and its queue score (band x 1e12 + seq).
local function queue_entry(job_id)
  local j = redis.call('HMGET', job_key(job_id), 'req_gpu', 'tenant', 'band', 'seq')
  return job_class(j[1]), j[2], tonumber(j[3]) * PRIORITY_SCALE + tonumber(j[4])
end

-- Place a queued job, or park it when no live node could ever hold it (its pending_reason is then
-- no_node_fits; it comes back when a node that fits registers).
local function place_or_park(job_id, now)
  local node_id = place(job_id, now)
  if node_id then return node_id end
  if not fits_some_node(job_requirements(job_id)) then
    local class, tenant, score = queue_entry(job_id)
    dequeue(job_id, class, tenant)
    redis.call('ZADD', QUEUE_PARKED, score, job_id)
  end
  return false
end

-- A node registered: parked jobs its profile fits go back to their queues (PARK_SCAN at most, in
-- priority then submission order); a gang once enough live nodes of one class fit it.
local function unpark_for(profile)
  local p = cjson.decode(profile)
  local moved = 0
  for _, job_id in ipairs(redis.call('ZRANGE', QUEUE_PARKED, 0, PARK_SCAN - 1)) do
    local r = job_requirements(job_id)
    if fits_profile(r, p) and (GANG.size(r) == 1 or fits_some_node(r)) then
      enqueue(job_id, queue_entry(job_id))
      moved = moved + 1
    end
  end
  return moved
end

-- Capacity appeared on ``node_id``: the queued gangs it could join, in queue order (GANG.SCAN looked at),
-- are each placed if their nodes are free now. Only gangs this node can take are tried: a try looks at up to
-- SCHEDULE_SCAN nodes per class, and this runs at every heartbeat of a node with room (a gang whose nodes
-- free up elsewhere is tried at those nodes' pulls). Once this node is held for a gang that could not be
-- placed, no later gang may take it: the look stops.
function GANG.place_waiting(node_id, now)
  local held = {GANG.reserving(now)}
  for _, job_id in ipairs(redis.call('ZRANGE', GANG.QUEUE, 0, GANG.SCAN - 1)) do
    local r = job_requirements(job_id)
    if r[10] ~= 'queued' then
      redis.call('ZREM', GANG.QUEUE, job_id)
    elseif node_can_take(node_id, r, now) and not tenant_at_running_limit(r[9], GANG.size(r)) then
      if GANG.reserved_for_other(node_id, job_id, now, held) then return end
      if GANG.place(job_id, r, now) then
        local n = redis.call('HMGET', node_key(node_id), 'slots', 'running')
        if not n[1] or tonumber(n[2]) >= tonumber(n[1]) then return end
        held = {GANG.reserving(now)}
      elseif job_id == held[1] then
        return  -- the gang this node is held for still waits
      end
    end
  end
end

-- Capacity appeared on a node: hand it queued jobs, fairly. Tenants with queued work are looked at in
-- the order of their best queued job; each offers its first job this node can take (its best band,
-- then FIFO, within QUEUE_SCAN of its queue). Tenants at their running limit are skipped at no cost;
-- the look stops at QUEUE_TENANTS offers or after PULL_BUDGET jobs were checked in all, so a heartbeat
-- stays cheap however the queue looks. The node then takes, slot by slot, the best band on offer and,
-- within a band, the tenant holding the fewest slots (fair share), then the oldest job. Parked jobs
-- are not looked at.
local function pull_queue(node_id, now)
  local assigned = {}
  pull_tasks(node_id, now)  -- verification tasks first: they hold results back
  local n = redis.call('HMGET', node_key(node_id), 'status', 'slots', 'running', 'class')
  if not n[1] or n[1] ~= 'online' then return assigned end
  local free = tonumber(n[2]) - tonumber(n[3])
  if free <= 0 then return assigned end
  GANG.place_waiting(node_id, now)
  n = redis.call('HMGET', node_key(node_id), 'status', 'slots', 'running', 'class')  -- a gang may have taken it
  free = tonumber(n[2]) - tonumber(n[3])
  if free <= 0 then return assigned end
  if GANG.reserved_for_other(node_id, nil, now) then return assigned end  -- held for a waiting gang
  local classes = {'cpu'}
  if n[4] == 'gpu' then classes = {'cpu', 'gpu'} end  -- a GPU node serves both
  local budget = PULL_BUDGET
  local function offer(tenant)
    if tenant_at_running_limit(tenant) then return nil end
    local best = nil
    for _, class in ipairs(classes) do
      local window = redis.call('ZRANGE', tenant_queue_key(class, tenant), 0, QUEUE_SCAN - 1, 'WITHSCORES')
      for i = 1, #window, 2 do
        local score = tonumber(window[i + 1])
        if budget <= 0 or (best and score >= best[2]) then break end
        budget = budget - 1
        local r = job_requirements(window[i])
        if GANG.size(r) == 1 and node_can_take(node_id, r, now) then  -- gangs are placed whole, above
          best = {window[i], score}
          break
        end
      end
    end
    return best
  end
  local order, offers, seen = {}, {}, {}
  for _, class in ipairs(classes) do
    local start = 0
    while #order < QUEUE_TENANTS and budget > 0 do
      local tenants = redis.call('ZRANGE', queue_tenants_key(class), start, start + QUEUE_TENANTS - 1)
      if #tenants == 0 then break end
      for _, tenant in ipairs(tenants) do
        if not seen[tenant] then
          seen[tenant] = true
          local o = offer(tenant)
          if o then
            table.insert(order, tenant)
            offers[tenant] = o
            if #order >= QUEUE_TENANTS or budget <= 0 then break end
          end
        end
      end
      start = start + QUEUE_TENANTS
    end
  end
  while free > 0 do
    local pick, pick_band, pick_held, pick_score = nil, 0, 0, 0
    for _, tenant in ipairs(order) do
      local o = offers[tenant]
      if o then
        local band, held = math.floor(o[2] / PRIORITY_SCALE), tenant_running(tenant)
        if not pick or band < pick_band or (band == pick_band and (held < pick_held
            or (held == pick_held and o[2] < pick_score))) then
          pick, pick_band, pick_held, pick_score = tenant, band, held, o[2]
        end
      end
    end
    if not pick then break end
    local job_id = offers[pick][1]
    -- an earlier pick may have used the memory or slot this offer counted on: ask again
    if node_can_take(node_id, job_requirements(job_id), now) and not tenant_at_running_limit(pick) then
      assign(job_id, node_id, now)
      table.insert(assigned, job_id)
      free = free - 1
    end
    offers[pick] = offer(pick)
  end
  return assigned
end

-- The reaper timer's sweep, SWEEP_BATCH jobs of each set per tick, each set walked round by a cursor:
-- parked jobs that some live node now fits go back to their queues (whatever registered, however many
-- are parked), and queued jobs that no live node fits any more (the last node that could hold them
-- left) are parked. A queued job missing from its tenant's queue is put back in it.
local function sweep_set(key, cursor_key, visit)
  local cursor = redis.call('GET', cursor_key)
  local low = '-inf'
  if cursor then low = '(' .. cursor end
  local batch = redis.call('ZRANGEBYSCORE', key, low, '+inf', 'WITHSCORES', 'LIMIT', 0, SWEEP_BATCH)
  for i = 1, #batch, 2 do visit(batch[i], tonumber(batch[i + 1])) end
  if #batch < 2 * SWEEP_BATCH then
    redis.call('DEL', cursor_key)
  else
    redis.call('SET', cursor_key, batch[#batch])
  end
end

local function sweep_queues()
  sweep_set(QUEUE_PARKED, sweep_cursor_key(QUEUE_PARKED), function(job_id, score)
    if fits_some_node(job_requirements(job_id)) then
      local j = redis.call('HMGET', job_key(job_id), 'req_gpu', 'tenant', 'status')
      if j[3] == 'queued' then enqueue(job_id, job_class(j[1]), j[2], score)
      else redis.call('ZREM', QUEUE_PARKED, job_id) end
    end
  end)
  for _, class in ipairs(NODE_CLASSES) do
    sweep_set(queue_key(class), sweep_cursor_key(queue_key(class)), function(job_id, score)
      local j = redis.call('HMGET', job_key(job_id), 'tenant', 'status')
      if j[2] ~= 'queued' then
        redis.call('ZREM', queue_key(class), job_id)
      elseif not fits_some_node(job_requirements(job_id)) then
        dequeue(job_id, class, j[1])
        redis.call('ZADD', QUEUE_PARKED, score, job_id)
      elseif not redis.call('ZSCORE', tenant_queue_key(class, j[1]), job_id) then
        enqueue(job_id, class, j[1], score)
      end
    end)
  end
end

-- A job leaves a node (ended, cancelled, lost or handed back): free its slot.
local remove_node  -- defined below; a draining node that runs its last job out is removed

-- Give back one slot of a node and ``memory`` MiB of its reservation (a job or a verification task left
-- it); a draining node that runs its last work out is removed.
local function free_slot(node_id, memory, now)
  local nk = node_key(node_id)
  if redis.call('EXISTS', nk) == 0 then return end
  if tonumber(redis.call('HGET', nk, 'running')) > 0 then redis.call('HINCRBY', nk, 'running', -1) end
  if memory > 0 and tonumber(redis.call('HINCRBY', nk, 'mem_reserved_mb', -memory)) < 0 then
    redis.call('HSET', nk, 'mem_reserved_mb', 0)
  end
  if redis.call('HGET', nk, 'status') == 'draining' and tonumber(redis.call('HGET', nk, 'running')) == 0 then
    remove_node(node_id, now, false)
  else
    rescore(node_id, now)
  end
end

-- The rank (0-based) a node holds in an attempt of a job: 0 for the node of a one-node job, a gang
-- member's place in nodes:{attempt}; nil when it holds no part of that attempt.
function GANG.rank(job_id, node_id, attempt)
  local j = redis.call('HMGET', job_key(job_id), 'node:' .. attempt, 'nodes:' .. attempt)
  if j[2] then
    for index, member in ipairs(cjson.decode(j[2])) do
      if member == node_id then return index - 1 end
    end
    return nil
  end
  if j[1] == node_id then return 0 end
  return nil
end

-- A job leaves its node(s) (ended, cancelled, lost or handed back): free the slot of every node holding
-- its current attempt. ``told``: the node that knows already (it reported the end, or is being removed);
-- every other member of a gang still holding the attempt is told to stop it (``job:attempt`` in its cancel
-- set, the heartbeat's ``stop`` list; a later attempt of the same job on the same node is not touched).
-- nil: every member is told.
local function release(job_id, node_id, now, told)
  if not node_id or node_id == '' then return end
  local jk = job_key(job_id)
  local j = redis.call('HMGET', jk, 'attempt', 'memory_mb')
  local memory = tonumber(j[2] or '0')
  local members = redis.call('HGET', jk, 'nodes:' .. (j[1] or ''))
  if members then
    for _, member in ipairs(cjson.decode(members)) do
      if redis.call('SREM', node_jobs_key(member), job_id) == 1 then
        if member ~= told then redis.call('SADD', node_cancels_key(member), job_id .. ':' .. j[1]) end
        free_slot(member, memory, now)
      end
    end
    return
  end
  if redis.call('SREM', node_jobs_key(node_id), job_id) == 0 then return end  -- released already
  free_slot(node_id, memory, now)
end

-- Put an assigned/running job back in the queue with attempt + 1. lost = the node failed it, which
-- spends one of max_attempts; a hand-back (draining node) does not. Returns the new status.
local function requeue(job_id, now, lost, reason)
  local jk = job_key(job_id)
  local j = redis.call('HMGET', jk, 'status', 'tenant', 'seq', 'attempt', 'lost_count', 'max_attempts', 'band',
    'req_gpu')
  local lost_count = tonumber(j[5])
  if lost then lost_count = lost_count + 1 end
  redis.call('HINCRBY', STATS, 'reassignments', 1)
  redis.call('HSET', jk, 'attempt', tonumber(j[4]) + 1, 'lost_count', lost_count, 'node_id', '', 'queued_ms', now,
    'ended:' .. j[4], string.sub(reason, 1, 1000))
  if lost_count >= tonumber(j[6]) then
    set_status(job_id, j[1], 'failed', j[2], j[3])
    redis.call('HSET', jk, 'finished_ms', now,
      'error', 'node lost ' .. lost_count .. ' time(s), max_attempts reached: ' .. reason)
    return 'failed'
  end
  set_status(job_id, j[1], 'queued', j[2], j[3])
  enqueue(job_id, job_class(j[8]), j[2], tonumber(j[7]) * PRIORITY_SCALE + tonumber(j[3]))
  return 'queued'
end

-- Remove a node and everything it holds; its live jobs go back to the queue (and are placed again
-- at once where a free node fits). lost = the heartbeat lapsed (the node's fault).
-- A node leaving (draining or removed) no longer counts as one that could hold a job.
local function forget_profile(node_id)
  local profile = redis.call('HGET', node_key(node_id), 'profile')
  if profile and tonumber(redis.call('HINCRBY', NODES_PROFILES, profile, -1)) <= 0 then
    redis.call('HDEL', NODES_PROFILES, profile)
  end
  redis.call('HDEL', node_key(node_id), 'profile')
  if redis.call('HGET', node_key(node_id), 'kind_counted') == '1' then
    local kind = redis.call('HGET', node_key(node_id), 'device_kind')
    if tonumber(redis.call('HINCRBY', NODES_KINDS, kind, -1)) <= 0 then redis.call('HDEL', NODES_KINDS, kind) end
    redis.call('HSET', node_key(node_id), 'kind_counted', '0')
  end
end

remove_node = function(node_id, now, lost)
  local name = redis.call('HGET', NODE_NAMES, node_id)
  forget_profile(node_id)  -- first, so its jobs are parked if no other node could hold them
  local moved = 0
  for _, job_id in ipairs(redis.call('SMEMBERS', node_jobs_key(node_id))) do
    local j = redis.call('HMGET', job_key(job_id), 'status', 'node_id', 'attempt')
    if (j[1] == 'assigned' or j[1] == 'running') and GANG.rank(job_id, node_id, j[3]) then
      moved = moved + 1
      if j[2] ~= node_id or redis.call('HEXISTS', job_key(job_id), 'nodes:' .. j[3]) == 1 then
        -- a gang: its other members stop this attempt and free their slots
        redis.call('SREM', node_jobs_key(node_id), job_id)
        release(job_id, node_id, now, node_id)
      end
      if requeue(job_id, now, lost, 'heartbeat of node ' .. node_id .. ' lapsed') == 'queued' then
        place_or_park(job_id, now)
      end
    end
  end
  local tasks = drop_node_tasks(node_id)
  redis.call('ZREM', NODES_SCORE, node_id)
  redis.call('ZREM', NODES_DEADLINE, node_id)
  for _, class in ipairs(NODE_CLASSES) do redis.call('ZREM', nodes_free_key(class), node_id) end
  redis.call('DEL', node_key(node_id), node_jobs_key(node_id), node_cancels_key(node_id), node_stream_key(node_id))
  redis.call('HDEL', NODE_NAMES, node_id)
  if name then redis.call('ZADD', NODES_LAST_SEEN, now, name) end
  if name and redis.call('HGET', NODE_BY_NAME, name) == node_id then redis.call('HDEL', NODE_BY_NAME, name) end
  redis.call('SADD', NODE_USERS_TO_DELETE, node_id)  -- its store user goes too (scripts cannot run ACL)
  for _, task_id in ipairs(tasks) do place_task(task_id, now) end
  if lost then
    if moved > 0 then
      for _ = 1, moved do adjust_reputation(node_id, name, 'node_fault', now) end
    else
      adjust_reputation(node_id, name, 'lapsed', now)
    end
  end
  return moved
end

-- A node that heartbeats but never starts what it was given (it cannot read its stream, say) must not
-- sit on jobs: an assignment not started within ASSIGN_TIMEOUT_MS goes back to the queue and counts
-- against the node (reputation) and as one of the job's attempts, so a job that keeps bouncing ends
-- failed with that reason. Time the whole control plane was down does not count.
-- A gang whose ranks did not all join the rendezvous within GANG.RENDEZVOUS_TIMEOUT_MS of its placement fails
-- that attempt as the fault of the nodes that did not show up: the ranks that never arrived (rank 0 has not
-- arrived until it published its store: without it no other rank can get ready), or when all arrived, those
-- that never got ready (connected to rank 0's store). Likewise, once a rank reported that it lost its peers
-- (fault ``peer``), every other rank must end the attempt within as long (its own failure report, a peer
-- report, or its node's reaping): the ranks still silent then are at fault. They pay in reputation and do
-- not get the job again first; every member still holding the attempt is told to stop it; the job goes
-- back to the queue with attempt + 1. Time the whole control plane was down does not count.
function GANG.expire_rendezvous(job_id, now)
  local jk = job_key(job_id)
  local j = redis.call('HMGET', jk, 'status', 'attempt')
  if j[1] ~= 'assigned' and j[1] ~= 'running' then return end
  local members = redis.call('HGET', jk, 'nodes:' .. j[2])
  if not members then return end
  local rk = GANG.rendezvous_key(job_id)
  local rdv = redis.call('HMGET', rk, 'attempt', 'started_ms', 'complete', 'master', 'peer_since')
  if rdv[1] ~= j[2] or rdv[3] == 'failed' then return end
  local resumed = tonumber(redis.call('GET', PLANE_RESUMED) or '0')
  local function past(since) return since and now - math.max(tonumber(since), resumed) > GANG.RENDEZVOUS_TIMEOUT_MS end
  members = cjson.decode(members)
  local timeout = (GANG.RENDEZVOUS_TIMEOUT_MS / 1000) .. ' s'
  local absent, why = {}, nil
  if not rdv[3] and past(rdv[2] or now) then
    why = ' did not join the rendezvous within ' .. timeout
    for _, field in ipairs({'arrived:', 'ready:'}) do
      for rank, member in ipairs(members) do
        local missing = redis.call('HEXISTS', rk, field .. (rank - 1)) == 0
        if field == 'arrived:' and rank == 1 and not rdv[4] then missing = true end
        if missing then table.insert(absent, {rank - 1, member}) end
      end
      if #absent > 0 then break end
    end
  elseif past(rdv[5]) then
    why = ' did not end the attempt within ' .. timeout .. ' of a rank reporting that it lost its peers'
    for rank, member in ipairs(members) do
      if redis.call('HEXISTS', rk, 'peer:' .. (rank - 1)) == 0 then table.insert(absent, {rank - 1, member}) end
    end
  end
  if #absent == 0 then return end
  local names, ids = {}, {}
  for _, a in ipairs(absent) do
    adjust_reputation(a[2], redis.call('HGET', NODE_NAMES, a[2]), 'node_fault', now)
    table.insert(ids, a[2])
    table.insert(names, 'rank ' .. a[1] .. ' (node ' .. a[2] .. ')')
  end
  avoid(job_id, ids, now)
  release(job_id, members[1], now, nil)
  redis.call('HSET', rk, 'complete', 'failed')
  if requeue(job_id, now, true, table.concat(names, ', ') .. why) == 'queued' then place_or_park(job_id, now) end
end

local function expire_stale_assignments(node_id, now)
  local resumed = nil
  for _, job_id in ipairs(redis.call('SMEMBERS', node_jobs_key(node_id))) do
    local j = redis.call('HMGET', job_key(job_id), 'status', 'node_id', 'assigned_ms', 'gang')
    if tonumber(j[4] or '1') > 1 then  -- a gang: its rendezvous deadlines first (one-node jobs have none)
      GANG.expire_rendezvous(job_id, now)
      j = redis.call('HMGET', job_key(job_id), 'status', 'node_id', 'assigned_ms', 'gang')
    end
    if j[1] == 'assigned' and j[2] == node_id and now - tonumber(j[3]) > ASSIGN_TIMEOUT_MS then
      resumed = resumed or tonumber(redis.call('GET', PLANE_RESUMED) or '0')
      if now - math.max(tonumber(j[3]), resumed) > ASSIGN_TIMEOUT_MS then
        release(job_id, node_id, now, node_id)
        local reason = 'node ' .. node_id .. ' did not start it within ' .. (ASSIGN_TIMEOUT_MS / 1000)
          .. ' s of its assignment (it could not read its assignment stream?)'
        adjust_reputation(node_id, redis.call('HGET', NODE_NAMES, node_id), 'node_fault', now)
        if requeue(job_id, now, true, reason) == 'queued' then place_or_park(job_id, now) end
      end
    end
  end
end

-- The control plane's pulse: every script that reaps marks the time. A gap longer than OUTAGE_GAP_MS
-- means nothing ran (gateway or store down), so no heartbeat could land: every node alive when the
-- silence began gets a fresh TTL from now instead of being reaped for it (as Kubernetes' node
-- controller stops evicting when the whole fleet goes silent at once).
local function plane_pulse(now)
  local last = tonumber(redis.call('GET', PLANE_PULSE) or '0')
  redis.call('SET', PLANE_PULSE, string.format('%d', now))
  if last > 0 and now - last > OUTAGE_GAP_MS then
    redis.call('SET', PLANE_RESUMED, string.format('%d', now))
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', NODES_DEADLINE, string.format('(%d', last), '+inf')) do
      local ttl = tonumber(redis.call('HGET', node_key(id), 'ttl_ms') or '0')
      redis.call('ZADD', NODES_DEADLINE, 'GT', now + ttl, id)
    end
  end
end

-- End a job that is not terminal from outside its node (a user's cancel, the wall-clock limit): its
-- status, out of the queues, and its node hears of it at its next heartbeat and frees the slot now.
-- Returns the node it was on ('' if none).
local function end_job(job_id, to, error_text, now)
  local j = redis.call('HMGET', job_key(job_id), 'status', 'tenant', 'seq', 'node_id', 'req_gpu')
  set_status(job_id, j[1], to, j[2], j[3])
  redis.call('HSET', job_key(job_id), 'finished_ms', now, 'error', error_text)
  redis.call('HDEL', job_key(job_id), 'held')  -- a result awaiting its audit is dropped with the job
  dequeue(job_id, job_class(j[5]), j[2])
  if j[4] ~= '' then
    redis.call('SADD', node_cancels_key(j[4]), job_id)
    release(job_id, j[4], now, j[4])
  end
  return j[4]
end

-- Jobs past their wall-clock limit (training.max_duration_s from their first start) fail, the job's
-- fault; their node hears of it as a cancel and stops them.
local function expire_job_deadlines(now)
  for _, job_id in ipairs(redis.call('ZRANGEBYSCORE', JOBS_DEADLINE, '-inf', now, 'LIMIT', 0, REAP_BATCH)) do
    redis.call('ZREM', JOBS_DEADLINE, job_id)
    local j = redis.call('HMGET', job_key(job_id), 'status', 'max_duration_ms')
    if j[1] and not TERMINAL[j[1]] then
      end_job(job_id, 'failed', 'the job ran past its wall-clock limit, training.max_duration_s = '
        .. math.floor(tonumber(j[2]) / 1000) .. ' s (the job\'s fault)', now)
    end
  end
end

-- Retention: jobs that ended RETENTION_MS ago go with their progress, artifacts and index entries;
-- node names unseen for as long (and not registered now) lose their reputation, cool-off and identity.
local function purge_expired(now)
  local before = now - RETENTION_MS
  for _, job_id in ipairs(redis.call('ZRANGEBYSCORE', JOBS_FINISHED, '-inf', before, 'LIMIT', 0, REAP_BATCH)) do
    local jk = job_key(job_id)
    local j = redis.call('HMGET', jk, 'tenant', 'status', 'artifacts', 'attempt')
    if j[1] then
      for _, name in ipairs(cjson.decode(j[3] or '[]')) do redis.call('DEL', artifact_key(job_id, name)) end
      for _, raw in ipairs(redis.call('HVALS', job_states_key(job_id))) do  -- checkpoints kept per (attempt, step)
        local artifact = cjson.decode(raw).artifact
        if type(artifact) == 'string' and artifact ~= '' then redis.call('DEL', artifact_key(job_id, artifact)) end
      end
      for _, t in ipairs({j[1], false}) do
        redis.call('ZREM', jobs_index_key(t or nil, nil), job_id)
        redis.call('ZREM', jobs_index_key(t or nil, j[2]), job_id)
      end
    end
    redis.call('DEL', jk, job_progress_key(job_id), job_uploads_key(job_id), job_states_key(job_id),
      GANG.rendezvous_key(job_id))
    for attempt = 1, tonumber(j[4] or '0') do redis.call('DEL', job_logs_key(job_id, attempt)) end
    redis.call('ZREM', JOBS_FINISHED, job_id)
  end
  for _, name in ipairs(redis.call('ZRANGEBYSCORE', NODES_LAST_SEEN, '-inf', before, 'LIMIT', 0, REAP_BATCH)) do
    if redis.call('HEXISTS', NODE_BY_NAME, name) == 0 then
      redis.call('HDEL', REPUTATION, name)
      redis.call('HDEL', COOLOFF, name)
      redis.call('HDEL', NODE_IDENTITIES, name)
    end
    redis.call('ZREM', NODES_LAST_SEEN, name)
  end
end

-- Reaping: nodes whose deadline passed, REAP_BATCH at most per call (every gateway also runs REAP on
-- a timer, so a quiet fleet is reaped too).
local function reap_expired(now)
  plane_pulse(now)
  local reaped = {}
  for _, node_id in ipairs(redis.call('ZRANGEBYSCORE', NODES_DEADLINE, '-inf', now, 'LIMIT', 0, REAP_BATCH)) do
    remove_node(node_id, now, true)
    redis.call('HINCRBY', STATS, 'nodes_reaped', 1)
    table.insert(reaped, node_id)
  end
  return reaped
end
"""


QUEUE_TENANTS = 64  # tenants with queued work a free node looks at (best queued job first)
PARK_SCAN = 1000  # parked jobs a registering node looks at
MAX_HANDBACKS = 10  # hand-backs beyond this count as lost attempts
PULL_BUDGET = 2000  # queued jobs one pull_queue checks at most, over every tenant
SWEEP_BATCH = 200  # parked and queued jobs the reaper timer re-checks per tick, per set
AVOID_MS = 60_000  # a node that failed or handed back a job does not get it again for this long
GANG_SCAN = 4  # queued gangs a free node's pull tries to place (each needs several nodes at once)


def build_prelude(settings: Settings) -> str:
    """The Lua text every script starts with, with this process's tunables compiled in."""
    terminal = ", ".join(f"['{s}'] = true" for s in sorted(TERMINAL))
    constants = (
        f"local SCHEDULE_SCAN = {settings.schedule_scan}\n"
        f"local QUEUE_SCAN = {settings.queue_scan}\n"
        f"local REAP_BATCH = {settings.reap_batch}\n"
        f"local REPUTATION_START = '0.75'\n"
        f"local REPUTATION_FLOOR = {settings.reputation_floor}\n"
        f"local COOLOFF_MS = {int(settings.cooloff_s * 1000)}\n"
        f"local ASSIGN_TIMEOUT_MS = {int(settings.assign_timeout_s * 1000)}\n"
        f"local OUTAGE_GAP_MS = {int(settings.outage_gap_s * 1000)}\n"
        f"local MAX_RUNNING_JOBS = {settings.max_running_jobs}\n"
        f"local QUEUE_TENANTS = {QUEUE_TENANTS}\n"
        f"local PARK_SCAN = {PARK_SCAN}\n"
        f"local MAX_HANDBACKS = {MAX_HANDBACKS}\n"
        f"local PULL_BUDGET = {PULL_BUDGET}\n"
        f"local MIN_JOB_MEMORY_MB = {TORCH_MB}\n"
        f"local SWEEP_BATCH = {SWEEP_BATCH}\n"
        f"local AVOID_MS = {AVOID_MS}\n"
        f"GANG.SCAN = {GANG_SCAN}\n"
        f"GANG.RESERVE_MS = {int(settings.gang_reserve_s * 1000)}\n"
        f"GANG.RENDEZVOUS_TIMEOUT_MS = {int(settings.rendezvous_timeout_s * 1000)}\n"
        f"local RETENTION_MS = {int(settings.retention_days * 86_400_000)}\n"
        f"local TERMINAL = {{{terminal}}}\n"
        f"local PRIORITY_SCALE = {PRIORITY_SCALE}\n"
        f"local PROBATION_AUDITS = {settings.probation_audits}\n"
        f"local AUDIT_FRACTION = {settings.audit_fraction!r}\n"
        f"local AUDIT_TOLERANCE = {settings.audit_tolerance!r}\n"
        f"local AUDIT_CROSS_TOLERANCE = {settings.audit_cross_tolerance!r}\n"
        # both 0: a private cluster of trusted nodes, no audits at all
        f"local AUDITS_ON = {'true' if settings.probation_audits > 0 or settings.audit_fraction > 0 else 'false'}\n"
        f"local KEEP_CHECKPOINTS = {settings.keep_checkpoints}\n"
        f"local TASK_SCAN = {TASK_SCAN}\n"
        f"local RECHECK_MAX = {RECHECK_MAX}\n"
        f"local AUDIT_EVERY_MS = {AUDIT_EVERY_MS}\n"
    )
    return LUA_KEY_BUILDERS + LUA_TRANSITIONS + constants + _HELPERS + VERIFY_HELPERS
