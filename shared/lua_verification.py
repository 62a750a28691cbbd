"""Lua for trusting results (docs/verification.md): provenance chains, audit choice, verification tasks,
their verdicts, and slashing.

:data:`VERIFY_HELPERS` is appended to the prelude (after the scheduling helpers it uses); the scripts
:data:`VERIFY_RESULT` and :data:`OBSERVE` are in :mod:`shared.lua` beside the others.

A job's training is a chain of recorded states (``cyxwiz:job:{id}:states``): the seed's initial
weights (``""``), then checkpoints, then the final weights, each naming the state before it (``prev``)
and the node identity that produced it. A segment is two consecutive states; an audit replays one
segment on another node of the same device kind and compares digests (or, when the replay is not
bitwise equal, a distance relative to the segment's own update).
"""

from __future__ import annotations

TASK_SCAN = 50  # queued verification tasks a node with a free slot looks at
RECHECK_MAX = 100  # results of a slashed identity re-checked at once (the rest by retention)
AUDIT_EVERY_MS = 86_400_000  # a trusted identity's work is audited at least once a day

VERIFY_HELPERS = r"""
-- ===== verification ================================================================================
local function audits(name, what)
  if not name then return 0 end
  return tonumber(redis.call('HGET', NODES_AUDITS, name .. ':' .. what) or '0')
end

on_probation = function(name)
  if PROBATION_AUDITS <= 0 or not name then return false end
  return audits(name, 'passed') < PROBATION_AUDITS
end

local function is_banned(name)
  return name ~= nil and name ~= '' and redis.call('HEXISTS', NODES_BANNED, name) == 1
end

local function get_state(job_id, id)
  if not id or id == '' then return nil end
  local raw = redis.call('HGET', job_states_key(job_id), id)
  if not raw then return nil end
  return cjson.decode(raw)
end

local function put_state(job_id, state)
  redis.call('HSET', job_states_key(job_id), state.id, cjson.encode(state))
end

-- The chain that ends at state id: oldest first (its first state's prev is '', the initial weights).
local function chain_from(job_id, id)
  local reversed, guard = {}, 0
  while id and id ~= '' and guard < 100000 do
    local s = get_state(job_id, id)
    if not s then break end
    table.insert(reversed, s)
    id = s.prev
    guard = guard + 1
  end
  local states = {}
  for i = #reversed, 1, -1 do table.insert(states, reversed[i]) end
  return states
end

local function has_bytes(job_id, s)
  return s ~= nil and (s.artifact or '') ~= '' and redis.call('EXISTS', artifact_key(job_id, s.artifact)) == 1
end

-- Where a new attempt starts: the latest recorded state whose bytes are kept, and before which no
-- slashed identity worked ('' = the seed's initial weights).
start_state = function(job_id)
  local states = chain_from(job_id, redis.call('HGET', job_key(job_id), 'resume_state') or '')
  local limit = #states
  for i, s in ipairs(states) do
    if is_banned(s.node) then
      limit = i - 1
      break
    end
  end
  for i = limit, 1, -1 do
    if not states[i].final and has_bytes(job_id, states[i]) then return states[i].id end
  end
  return ''
end

-- Record a state this attempt produced, after the state it last recorded (or started from). Returns an
-- error sentence, or nil.
local function record_state(job_id, attempt, node_id, state, now)
  local jk = job_key(job_id)
  local last = redis.call('HGET', jk, 'last_state:' .. attempt) or redis.call('HGET', jk, 'start:' .. attempt) or ''
  local prev = get_state(job_id, last)
  if last == state.id and prev then
    last = prev.prev
    prev = get_state(job_id, last)
  end
  if prev and state.step < prev.step then
    return 'it is at step ' .. state.step .. ', behind the state attempt ' .. attempt
      .. ' started from or last saved (step ' .. prev.step .. ')'
  end
  local n = redis.call('HMGET', node_key(node_id), 'name', 'device_kind')
  state.prev = last
  state.attempt = tonumber(attempt)
  state.node_id = node_id
  state.node = n[1] or redis.call('HGET', NODE_NAMES, node_id) or ''
  state.kind = n[2] or 'cpu'
  state.ms = now
  put_state(job_id, state)
  redis.call('HSET', jk, 'last_state:' .. attempt, state.id)
  return nil
end

-- Keep at most KEEP_CHECKPOINTS checkpoints beside the newest: drop one at random (draw in [0, 1)) that
-- no attempt starts from and no audit needs. Its digests stay in the chain.
local function trim_checkpoints(job_id, draw)
  local jk = job_key(job_id)
  local kept = cjson.decode(redis.call('HGET', jk, 'checkpoints') or '[]')
  if #kept <= KEEP_CHECKPOINTS + 1 then return end
  local protected = {}
  local attempt = redis.call('HGET', jk, 'attempt')
  for _, field in ipairs({'resume_state', 'start:' .. attempt, 'last_state:' .. attempt}) do
    protected[redis.call('HGET', jk, field) or ''] = true
  end
  local task = redis.call('HGET', jk, 'verify_task')
  if task and task ~= '' then
    local t = redis.call('HMGET', verify_key(task), 'from', 'to')
    protected[t[1] or ''] = true
    protected[t[2] or ''] = true
  end
  local choices = {}
  for i = 1, #kept - 1 do
    if not protected[kept[i]] then table.insert(choices, i) end
  end
  if #choices == 0 then return end
  local index = choices[math.min(#choices, 1 + math.floor(draw * #choices))]
  local s = get_state(job_id, kept[index])
  table.remove(kept, index)
  redis.call('HSET', jk, 'checkpoints', cjson.encode(kept))
  if s and (s.artifact or '') ~= '' then
    local ak = artifact_key(job_id, s.artifact)
    local size = tonumber(redis.call('HGET', ak, 'size') or '0')
    redis.call('DEL', ak)
    redis.call('HINCRBY', jk, 'artifact_bytes', -size)
    s.artifact = ''
    put_state(job_id, s)
  end
end

-- Segments of the chain that ends at the job's final state: {index, from (nil: initial), to, steps}.
local function segments_of(job_id)
  local states = chain_from(job_id, redis.call('HGET', job_key(job_id), 'final_state') or '')
  local segs = {}
  for i, s in ipairs(states) do
    local from = states[i - 1]
    local start_step = 0
    if from then start_step = from.step end
    table.insert(segs, {index = i, from = from, to = s, steps = s.step - start_step, next = states[i + 1]})
  end
  return segs
end

-- Can some live node of this device kind ('*': any kind), other than the excluded names, replay a segment?
local function verifier_possible(kind, exclude)
  local count = 0
  if kind == '*' then
    local kinds = redis.call('HVALS', NODES_KINDS)
    for _, n in ipairs(kinds) do count = count + tonumber(n) end
  else
    count = tonumber(redis.call('HGET', NODES_KINDS, kind) or '0')
  end
  for _, name in ipairs(exclude) do
    local live = redis.call('HGET', NODE_BY_NAME, name)
    if live and (kind == '*' or redis.call('HGET', node_key(live), 'device_kind') == kind)
        and redis.call('HGET', node_key(live), 'kind_counted') == '1' then
      count = count - 1
    end
  end
  return count > 0
end

-- Is the task still wanted: its job's current audit, the job held (or completed, for a re-check)? A task
-- of a job cancelled or retrained meanwhile ends here instead of costing a replay.
local function task_wanted(task_id)
  local job_id = redis.call('HGET', verify_key(task_id), 'job_id')
  local j = job_id and redis.call('HMGET', job_key(job_id), 'status', 'verify_task', 'held')
  if j and j[2] == task_id and ((j[3] == '1' and not TERMINAL[j[1]]) or j[1] == 'completed') then return true end
  redis.call('ZREM', VERIFY_QUEUE, task_id)
  redis.call('HSET', verify_key(task_id), 'status', 'done', 'outcome', 'obsolete')
  redis.call('PEXPIRE', verify_key(task_id), RETENTION_MS)
  return false
end

-- Could this node replay this task now?
local function task_fits_node(task_id, node_id, now)
  local t = redis.call('HMGET', verify_key(task_id), 'kind', 'exclude', 'memory_mb', 'status')
  if not t[1] or t[4] ~= 'queued' then return false end
  local n = redis.call('HMGET', node_key(node_id), 'status', 'slots', 'running', 'name', 'health', 'mem_job_mb',
    'mem_total_mb', 'mem_reserved_mb', 'device_kind')
  if not n[1] or (t[1] ~= '*' and n[9] ~= t[1]) or is_banned(n[4]) then return false end
  for _, name in ipairs(cjson.decode(t[2])) do
    if name == n[4] then return false end
  end
  return node_has_room(node_id, n, tonumber(t[3] or '0'), now)
end

local function assign_task(task_id, node_id, now)
  local vk = verify_key(task_id)
  local attempt = redis.call('HINCRBY', vk, 'attempt', 1)
  local t = redis.call('HMGET', vk, 'job_id', 'memory_mb', 'from_artifact', 'to_artifact', 'to_step', 'to_final',
    'threads', 'round', 'from_step')
  -- a replay gets the assignment timeout plus twice as long as the trainer took for the segment
  local took = tonumber(redis.call('HGET', vk, 'segment_ms') or '0')
  redis.call('HSET', vk, 'status', 'assigned', 'node_id', node_id, 'assigned_ms', now, 'phase', '',
    'deadline_ms', now + ASSIGN_TIMEOUT_MS + 2 * took)
  redis.call('ZREM', VERIFY_QUEUE, task_id)
  redis.call('HINCRBY', node_key(node_id), 'running', 1)
  redis.call('HINCRBY', node_key(node_id), 'mem_reserved_mb', tonumber(t[2] or '0'))
  redis.call('SADD', node_tasks_key(node_id), task_id)
  redis.call('HSET', job_key(t[1]), 'verify_verifier', node_id)
  local segment = cjson.encode({from_artifact = t[3], from_step = tonumber(t[9]), to_step = tonumber(t[5]),
    to_final = t[6] == '1', threads = tonumber(t[7]), round = tonumber(t[8])})
  redis.call('XADD', node_stream_key(node_id), 'MAXLEN', '~', NODE_STREAM_MAXLEN, '*',
    'job_id', t[1], 'attempt', attempt, 'spec', redis.call('HGET', job_key(t[1]), 'spec'), 'memory_mb', t[2] or '0',
    'task_id', task_id, 'segment', segment)
  rescore(node_id, now)
end

-- A queued task onto the best free node of its kind, if one can take it now.
place_task = function(task_id, now)
  local kind = redis.call('HGET', verify_key(task_id), 'kind')
  if not kind or not task_wanted(task_id) then return false end
  local classes = {'gpu'}
  if kind == 'cpu' then classes = {'cpu'} elseif kind == '*' then classes = NODE_CLASSES end
  local held = {GANG.reserving(now)}
  for _, class in ipairs(classes) do
    for _, node_id in ipairs(redis.call('ZREVRANGE', nodes_free_key(class), 0, SCHEDULE_SCAN - 1)) do
      if task_fits_node(task_id, node_id, now) and not GANG.reserved_for_other(node_id, nil, now, held) then
        assign_task(task_id, node_id, now)
        return node_id
      end
    end
  end
  return false
end

pull_tasks = function(node_id, now)
  local tasks = redis.call('ZRANGE', VERIFY_QUEUE, 0, TASK_SCAN - 1)
  if #tasks == 0 or GANG.reserved_for_other(node_id, nil, now) then return end  -- held for a waiting gang
  for _, task_id in ipairs(tasks) do
    if task_fits_node(task_id, node_id, now) and task_wanted(task_id) then assign_task(task_id, node_id, now) end
  end
end

-- A task leaves its node (ended, failed, handed back): free the slot.
local function release_task(task_id, node_id, now)
  if not node_id or node_id == '' then return end
  if redis.call('SREM', node_tasks_key(node_id), task_id) == 0 then return end
  free_slot(node_id, tonumber(redis.call('HGET', verify_key(task_id), 'memory_mb') or '0'), now)
end

-- Back to the verification queue; ``exclude`` (a name) may not take it again.
local function requeue_task(task_id, exclude)
  local vk = verify_key(task_id)
  if redis.call('EXISTS', vk) == 0 then return end
  if exclude and exclude ~= '' then
    local names = cjson.decode(redis.call('HGET', vk, 'exclude'))
    table.insert(names, exclude)
    redis.call('HSET', vk, 'exclude', cjson.encode(names))
  end
  redis.call('HSET', vk, 'status', 'queued', 'node_id', '', 'phase', '')
  redis.call('ZADD', VERIFY_QUEUE, tonumber(redis.call('HGET', vk, 'created_ms')), task_id)
end

-- A removed node's tasks go back to the queue (placed again by the caller once the node is gone).
drop_node_tasks = function(node_id)
  local tasks = redis.call('SMEMBERS', node_tasks_key(node_id))
  for _, task_id in ipairs(tasks) do requeue_task(task_id, nil) end
  redis.call('DEL', node_tasks_key(node_id))
  return tasks
end

local function end_task(task_id, outcome)
  redis.call('ZREM', VERIFY_QUEUE, task_id)
  redis.call('HSET', verify_key(task_id), 'status', 'done', 'outcome', outcome or 'obsolete', 'done_ms', now_ms())
  redis.call('PEXPIRE', verify_key(task_id), RETENTION_MS)
end

local function create_task(job_id, round, index, from, to, exclude, now, recheck, first_verifier, kind)
  kind = kind or to.kind or 'cpu'
  local task_id = 'v-' .. string.sub(job_id, 3) .. '-' .. round .. '-' .. now .. '-' .. redis.call('INCR', JOB_SEQ)
  local from_id, from_artifact, from_step = '', '', 0
  if from then from_id, from_artifact, from_step = from.id, from.artifact or '', from.step end
  redis.call('HSET', verify_key(task_id), 'task_id', task_id, 'job_id', job_id, 'round', round, 'index', index,
    'from', from_id, 'to', to.id, 'from_artifact', from_artifact, 'from_step', from_step,
    'to_artifact', to.artifact or '', 'to_step', to.step, 'to_final', to.final and '1' or '0',
    'threads', tonumber(to.threads) or 0, 'kind', kind, 'producer', to.node or '',
    'exclude', cjson.encode(exclude),
    'status', 'queued', 'node_id', '', 'attempt', 0, 'created_ms', now, 'recheck', recheck and '1' or '0',
    'first_verifier', first_verifier or '', 'memory_mb', redis.call('HGET', job_key(job_id), 'memory_mb') or '0',
    'segment_ms', math.max(0, (tonumber(to.ms) or now) - (from and tonumber(from.ms) or
      tonumber(redis.call('HGET', job_key(job_id), 'assigned_ms:' .. (to.attempt or 0)) or now) or now)))
  redis.call('ZADD', VERIFY_QUEUE, now, task_id)
  if not recheck then redis.call('HSET', job_key(job_id), 'held', '1') end  -- its result waits for the verdict
  redis.call('HSET', job_key(job_id), 'verify_task', task_id, 'verify_status', 'pending', 'verify_round', round,
    'verify_segment', cjson.encode({index - 1, index}), 'verify_steps', cjson.encode({from_step, to.step}),
    'verify_verifier', '', 'verify_distance', '', 'verify_note', '')
  place_task(task_id, now)
  return task_id
end

-- Results that rest on work no audit checked, per identity: re-checked if it is ever slashed.
local function note_unaudited(job_id, audited_index, now)
  for _, seg in ipairs(segments_of(job_id)) do
    if seg.index ~= audited_index and (seg.to.node or '') ~= '' then
      local key = node_results_key(seg.to.node)
      redis.call('ZADD', key, now, job_id)
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now - RETENTION_MS)
    end
  end
end

-- A held result is released: the job completes and its trainer gets the success credit.
local function finish_held(job_id, now)
  local jk = job_key(job_id)
  local j = redis.call('HMGET', jk, 'status', 'tenant', 'seq', 'held', 'final_state')
  if j[4] ~= '1' then return end
  redis.call('HDEL', jk, 'held')
  if j[1] == 'running' or j[1] == 'assigned' then
    set_status(job_id, j[1], 'completed', j[2], j[3])
    redis.call('HSET', jk, 'finished_ms', now)
    local final = get_state(job_id, j[5])
    if final then adjust_reputation(final.node_id, final.node, 'success', now) end
  end
end

-- The result cannot be trusted: the job trains again (not counted against max_attempts), from the
-- latest state no slashed identity touched.
local function rerun(job_id, now, reason)
  local jk = job_key(job_id)
  local j = redis.call('HMGET', jk, 'status', 'tenant', 'seq', 'attempt', 'band', 'req_gpu', 'node_id')
  redis.call('HDEL', jk, 'held', 'finished_ms')
  if j[1] ~= 'running' and j[1] ~= 'assigned' and j[1] ~= 'completed' then return end
  if j[7] ~= '' then release(job_id, j[7], now, j[7]) end
  redis.call('HSET', jk, 'attempt', tonumber(j[4]) + 1, 'node_id', '', 'error', reason)
  redis.call('HINCRBY', STATS, 'reassignments', 1)
  set_status(job_id, j[1], 'queued', j[2], j[3])
  enqueue(job_id, job_class(j[6]), j[2], tonumber(j[5]) * PRIORITY_SCALE + tonumber(j[3]))
  place_or_park(job_id, now)
end

local recheck  -- below: slash() and recheck() call each other through it

-- A node identity that lied: reputation 0, banned (it cannot register again), removed if live (its jobs
-- go back to the queue), and the other results that rest on its unaudited work are re-checked.
local function slash(name, reason, now)
  if not name or name == '' or is_banned(name) then return end
  redis.call('HSET', NODES_BANNED, name, reason)
  redis.call('HINCRBY', NODES_AUDITS, name .. ':failed', 1)
  redis.call('HSET', REPUTATION, name, '0')
  redis.call('HSET', COOLOFF, name, now + 100 * 365 * 86400000)
  local live = redis.call('HGET', NODE_BY_NAME, name)
  if live and redis.call('EXISTS', node_key(live)) == 1 then remove_node(live, now, false) end
  for _, job_id in ipairs(redis.call('ZRANGE', node_results_key(name), 0, RECHECK_MAX - 1)) do
    local j = redis.call('HMGET', job_key(job_id), 'status', 'verify_status')
    if j[1] == 'completed' and j[2] ~= 'pending' then recheck(job_id, name, now) end
  end
  redis.call('DEL', node_results_key(name))
end

-- Replay the largest segment a slashed identity produced for a completed job; no replay possible
-- (its start is gone, or no other node of the kind): the job trains again.
recheck = function(job_id, name, now)
  local best = nil
  for _, seg in ipairs(segments_of(job_id)) do
    if seg.to.node == name and (not best or seg.steps > best.steps) then best = seg end
  end
  if not best then return end
  if (best.from == nil or has_bytes(job_id, best.from)) and verifier_possible(best.to.kind or 'cpu', {name}) then
    create_task(job_id, 1, best.index, best.from, best.to, {name}, now, true, nil)
  else
    redis.call('HSET', job_key(job_id), 'verify_status', 'failed',
      'verify_note', 'trained in part by ' .. name .. ', slashed since, and no replay possible: trained again')
    rerun(job_id, now, 'its result rested on work of node ' .. name .. ', which was caught lying; trained again')
  end
end

-- At completion: choose the segment to audit, or none. Returns 'pending' (the result is held until the
-- audit ends), 'skipped', or 'rerun' (the chain rests on a slashed identity's work).
local function begin_audit(job_id, now, draw, draw2)
  local jk = job_key(job_id)
  local segs = segments_of(job_id)
  for _, seg in ipairs(segs) do
    if is_banned(seg.to.node) then
      redis.call('HSET', jk, 'verify_status', 'failed', 'verify_note', 'rested on work of a slashed node')
      return 'rerun'
    end
  end
  if not AUDITS_ON then
    redis.call('HSET', jk, 'verify_status', 'skipped', 'verify_note', 'audits are off in this cluster')
    note_unaudited(job_id, 0, now)
    return 'skipped'
  end
  if tonumber(redis.call('HGET', jk, 'gang') or '1') > 1 then
    -- a replay on one node is not bitwise a gang's all-reduced steps (docs/distributed.md)
    redis.call('HSET', jk, 'verify_status', 'skipped', 'verify_note', 'multi-node results are not replayed yet')
    note_unaudited(job_id, 0, now)  -- so a later slash of an identity it rests on re-checks it
    return 'skipped'
  end
  local candidates, musts = {}, {}
  for _, seg in ipairs(segs) do
    local s, from = seg.to, seg.from
    local changed = from ~= nil and from.weights ~= s.weights
    if (seg.steps > 0 or changed) and (from == nil or has_bytes(job_id, from)) then
      table.insert(candidates, seg)
      local handoff = seg.next ~= nil and seg.next.node ~= s.node
      if handoff or on_probation(s.node) or now - audits(s.node, 'last_ms') > AUDIT_EVERY_MS then
        table.insert(musts, seg)
      end
    end
  end
  local function pick(list)
    local total = 0
    for _, seg in ipairs(list) do total = total + math.max(1, seg.steps) end
    local x = draw2 * total
    for _, seg in ipairs(list) do
      x = x - math.max(1, seg.steps)
      if x < 0 then return seg end
    end
    return list[#list]
  end
  local seg = nil
  if #musts > 0 then seg = pick(musts)
  elseif #candidates > 0 and draw < AUDIT_FRACTION then seg = pick(candidates) end
  if not seg then
    redis.call('HSET', jk, 'verify_status', 'skipped', 'verify_note', 'not drawn for an audit')
    note_unaudited(job_id, 0, now)
    return 'skipped'
  end
  local kind = seg.to.kind or 'cpu'
  if not verifier_possible(kind, {seg.to.node}) and on_probation(seg.to.node)
      and verifier_possible('*', {seg.to.node}) then
    kind = '*'  -- nobody else has what a new identity claims to have: a replay elsewhere, with a loose tolerance
  end
  if not verifier_possible(kind, {seg.to.node}) then
    redis.call('HSET', jk, 'verify_status', 'skipped', 'verify_segment', cjson.encode({seg.index - 1, seg.index}),
      'verify_note', 'no other live node of device kind ' .. kind .. ' to replay it')
    note_unaudited(job_id, 0, now)
    return 'skipped'
  end
  create_task(job_id, 1, seg.index, seg.from, seg.to, {seg.to.node}, now, false, nil, kind)
  return 'pending'
end

-- An audit passed: the producer's record, the verifier's credit, the job released.
local function audit_passed(job_id, t, verifier_id, distance, now)
  redis.call('HINCRBY', NODES_AUDITS, t.producer .. ':passed', 1)
  redis.call('HSET', NODES_AUDITS, t.producer .. ':last_ms', now)
  adjust_reputation(verifier_id, redis.call('HGET', NODE_NAMES, verifier_id), 'success', now)
  redis.call('HSET', job_key(job_id), 'verify_status', 'passed', 'verify_verifier', verifier_id,
    'verify_distance', distance)
  note_unaudited(job_id, tonumber(t.index), now)
  finish_held(job_id, now)
end

-- A replay's verdict. outcome 'match' (bitwise, or within the tolerance) or 'mismatch'. Round 1 mismatch:
-- a third node replays the same segment; round 2 decides: agreeing with the trainer slashes the first
-- verifier, disagreeing slashes the trainer. A re-check of a slashed identity's work needs one round.
local function conclude(task_id, t, outcome, verifier_id, distance, now)
  local job_id = t.job_id
  local jk = job_key(job_id)
  local verifier_name = redis.call('HGET', NODE_NAMES, verifier_id) or ''
  if outcome == 'match' then
    if t.round == '2' then
      slash(t.first_verifier, 'reported a wrong replay of job ' .. job_id
        .. ' (a third node agreed with the trainer)', now)
    end
    audit_passed(job_id, t, verifier_id, distance, now)
    return 'passed'
  end
  if t.round == '1' and t.recheck ~= '1' and not is_banned(t.producer) then
    local exclude = {t.producer, verifier_name}
    local from, to = get_state(job_id, t.from), get_state(job_id, t['to'])
    if to and (t.from == '' or has_bytes(job_id, from)) and verifier_possible(t.kind, exclude) then
      redis.call('HSET', jk, 'verify_first', verifier_id)
      create_task(job_id, 2, tonumber(t.index), from, to, exclude, now, false, verifier_name, t.kind)
      return 'second_opinion'
    end
    redis.call('HSET', jk, 'verify_status', 'failed', 'verify_verifier', verifier_id, 'verify_distance', distance,
      'verify_note', 'the replay did not match and no third node could decide; trained again, nobody slashed')
    rerun(job_id, now, 'its audit failed and could not be decided; trained again')
    return 'failed'
  end
  slash(t.producer, 'its training of job ' .. job_id .. ' was not reproduced by two other nodes', now)
  adjust_reputation(verifier_id, verifier_name, 'success', now)
  redis.call('HSET', jk, 'verify_status', 'failed', 'verify_verifier', verifier_id, 'verify_distance', distance,
    'verify_note', 'node ' .. t.producer .. ' lied about segment ' .. (tonumber(t.index) - 1) .. '-' .. t.index
    .. ' and was slashed; trained again')
  rerun(job_id, now, 'its audit showed node ' .. t.producer .. ' lied; trained again')
  return 'failed'
end

-- A verifier that holds a task past its deadline (it read it and went quiet) loses it: a node fault,
-- and another node gets the task. Checked at the verifier's heartbeats.
expire_tasks = function(node_id, now)
  for _, task_id in ipairs(redis.call('SMEMBERS', node_tasks_key(node_id))) do
    local deadline = tonumber(redis.call('HGET', verify_key(task_id), 'deadline_ms') or '0')
    if deadline > 0 and deadline < now then
      local name = redis.call('HGET', NODE_NAMES, node_id)
      release_task(task_id, node_id, now)
      adjust_reputation(node_id, name, 'node_fault', now)
      requeue_task(task_id, name)
      place_task(task_id, now)
    end
  end
end

-- The reaper timer: a queued task that no live node may take any more (the last other node of its
-- kind left) ends. A first audit is then skipped (the result is released, unaudited, as when no
-- verifier existed at completion); a second opinion that cannot be had retrains the job, slashing
-- nobody; a re-check of a slashed identity's work retrains it.
sweep_tasks = function(now)
  for _, task_id in ipairs(redis.call('ZRANGE', VERIFY_QUEUE, 0, TASK_SCAN - 1)) do
    local f = redis.call('HMGET', verify_key(task_id), 'kind', 'exclude', 'job_id', 'round', 'recheck', 'index')
    if not f[1] then
      redis.call('ZREM', VERIFY_QUEUE, task_id)
    elseif not verifier_possible(f[1], cjson.decode(f[2])) then
      end_task(task_id, 'no_verifier')
      local jk = job_key(f[3])
      if redis.call('HGET', jk, 'verify_task') == task_id then
        local note = 'no other live node of device kind ' .. f[1] .. ' is left to replay it'
        if f[4] == '1' and f[5] ~= '1' then
          redis.call('HSET', jk, 'verify_status', 'skipped', 'verify_note', note)
          note_unaudited(f[3], tonumber(f[6]), now)
          finish_held(f[3], now)
        else
          redis.call('HSET', jk, 'verify_status', 'failed', 'verify_note', note .. '; trained again, nobody slashed')
          rerun(f[3], now, 'its audit could not be decided (' .. note .. '); trained again')
        end
      end
    end
  end
end
"""

# A verifier's report on its task. phase: 'digest' (its replay's digests, before it sees the trainer's),
# 'distance' (after 'compare': its replay's distance to the trainer's bytes), 'failed' (it could not
# replay: the verifier's fault, another node gets the task), 'handback' (draining: another node, no
# charge).
VERIFY_RESULT = r"""
local task_id = ARGV[1]
local node_id = ARGV[2]
local attempt = ARGV[3]
local phase = ARGV[4]
local weights = ARGV[5]
local optimizer = ARGV[6]
local data = ARGV[7]
local distance = tonumber(ARGV[8])
local error_text = ARGV[9]
local token_hash = ARGV[10]
local samples_per_s = ARGV[11]
if token_hash ~= '' and not session_ok(node_id, token_hash) then return fail('unauthorized', SESSION_UNKNOWN) end
local vk = verify_key(task_id)
local fields = redis.call('HGETALL', vk)
if #fields == 0 then return fail('not_found', 'no verification task ' .. task_id) end
local t = {}
for i = 1, #fields, 2 do t[fields[i]] = fields[i + 1] end
if t.node_id ~= node_id then
  return fail('forbidden', 'verification task ' .. task_id .. ' is not assigned to node ' .. node_id)
end
if t.status ~= 'assigned' or tonumber(attempt) ~= tonumber(t.attempt) then
  return fail('stale_attempt', 'attempt ' .. attempt .. ' of verification task ' .. task_id .. ' is not current')
end
local now = now_ms()
local j = redis.call('HMGET', job_key(t.job_id), 'status', 'verify_task')
if not j[1] or j[2] ~= task_id or j[1] == 'cancelled' or j[1] == 'failed' or j[1] == 'queued' then
  release_task(task_id, node_id, now)
  end_task(task_id)
  pull_queue(node_id, now)
  return {'ok', 'obsolete'}
end
if phase == 'handback' or phase == 'failed' then
  release_task(task_id, node_id, now)
  if phase == 'failed' then
    adjust_reputation(node_id, redis.call('HGET', NODE_NAMES, node_id), 'node_fault', now)
    requeue_task(task_id, redis.call('HGET', NODE_NAMES, node_id))
  else
    requeue_task(task_id, nil)
  end
  place_task(task_id, now)
  pull_queue(node_id, now)
  return {'ok', 'requeued'}
end
local to = cjson.decode(redis.call('HGET', job_states_key(t.job_id), t['to']) or '{}')
local outcome, shown = nil, ''
if phase == 'digest' then
  redis.call('HSET', vk, 'v_weights', weights, 'v_optimizer', optimizer, 'v_data', data,
    'v_samples_per_s', samples_per_s)
  local same = weights == to.weights and (to.final or (to.optimizer or '') == '' or optimizer == to.optimizer)
    and (data == '' or (to.data or '') == '' or data == to.data)
  if same then
    outcome, shown = 'match', '0'
  elseif t.to_artifact ~= '' and redis.call('EXISTS', artifact_key(t.job_id, t.to_artifact)) == 1
      and string.sub(weights, 1, 6) ~= 'error:' then
    redis.call('HSET', vk, 'phase', 'compare')
    return {'compare', t.to_artifact}
  else
    outcome = 'mismatch'
  end
elseif phase == 'distance' then
  if t.phase ~= 'compare' then return fail('conflict', 'report the replay\'s digests first') end
  shown = tostring(distance)
  -- a replay on another kind of device than the trainer claims (a new identity nobody else can check)
  -- cannot be close, only not absurd
  local tolerance = AUDIT_TOLERANCE
  if t.kind == '*' then tolerance = AUDIT_CROSS_TOLERANCE end
  if distance ~= nil and distance <= tolerance then outcome = 'match' else outcome = 'mismatch' end
else
  return fail('invalid_field', 'unknown phase ' .. phase)
end
release_task(task_id, node_id, now)
end_task(task_id, outcome)
local verdict = conclude(task_id, t, outcome, node_id, shown, now)
pull_queue(node_id, now)
local from = cjson.decode(redis.call('HGET', job_states_key(t.job_id), t.from) or 'null')
local from_ms = redis.call('HGET', job_key(t.job_id), 'assigned_ms:' .. (to.attempt or 0)) or '0'
if from and from ~= cjson.null and from.attempt == to.attempt then from_ms = from.ms end
return {'ok', verdict, t.producer, t.job_id, tonumber(t.to_step) - tonumber(t.from_step), tostring(from_ms),
  tostring(to.ms or 0), tostring(now - tonumber(t.assigned_ms or now))}
"""

# Observed capability of an identity (0..1, from audited throughput; Python computes it) and, when its
# claims outran what was seen, a flag; the capability part of its score follows.
OBSERVE = r"""
local name = ARGV[1]
local observed = tonumber(ARGV[2])
local flag = ARGV[3]
local old = tonumber(redis.call('HGET', NODES_OBSERVED, name) or '')
if old then observed = (old + observed) / 2 end
redis.call('HSET', NODES_OBSERVED, name, tostring(observed))
if flag ~= '' then redis.call('HSET', NODES_FLAGS, name, flag) else redis.call('HDEL', NODES_FLAGS, name) end
local live = redis.call('HGET', NODE_BY_NAME, name)
if live and redis.call('EXISTS', node_key(live)) == 1 then rescore(live, now_ms()) end
return {'ok', tostring(observed)}
"""
