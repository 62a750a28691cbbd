"""Lua helpers shared by every script: key builders, the transition table, scoring, placement,
release, requeue and reaping.

Each script in :mod:`shared.lua` is this prelude followed by its own body, so a helper such as
``assign`` exists once and every caller moves a job the same way. All times are the Redis server's
clock (``TIME``), so function processes on different hosts agree.
"""

from __future__ import annotations

from shared.keys import LUA_KEY_BUILDERS
from shared.settings import Settings
from shared.transitions import LUA_TRANSITIONS, TERMINAL

_HELPERS = r"""
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

-- Move a job between statuses: the only place a status changes. Keeps the listing indexes in step.
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
end

-- Recompute a node's availability, uptime and score, and its place on the boards.
local function rescore(node_id, now)
  local nk = node_key(node_id)
  local f = redis.call('HMGET', nk, 'slots', 'running', 'reputation', 'capability', 'alive_since_ms',
    'w_rep', 'w_av', 'w_cap', 'w_up', 'status', 'class', 'name', 'gpu_free_frac', 'health')
  if not f[1] then return end
  local slots, running = tonumber(f[1]), tonumber(f[2])
  local avail = 0
  if slots > 0 then avail = math.max(0, slots - running) / slots end
  if f[13] and f[13] ~= '' then avail = (avail + tonumber(f[13])) / 2 end
  local uptime = math.min(1, math.max(0, now - tonumber(f[5])) / 86400000)
  local score = tonumber(f[6]) * tonumber(f[3]) + tonumber(f[7]) * avail
    + tonumber(f[8]) * tonumber(f[4]) + tonumber(f[9]) * uptime
  redis.call('HSET', nk, 'availability', tostring(avail), 'uptime', tostring(uptime), 'score', tostring(score))
  redis.call('ZADD', NODES_SCORE, score, node_id)
  local cool_until = tonumber(redis.call('HGET', COOLOFF, f[12]) or '0')
  if f[10] == 'online' and (f[14] or '') == '' and running < slots and cool_until <= now then
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
  elseif outcome == 'lapsed' then rep = rep * 0.95 end
  redis.call('HSET', REPUTATION, name, tostring(rep))
  if rep < REPUTATION_FLOOR then redis.call('HSET', COOLOFF, name, now + COOLOFF_MS) end
  if redis.call('EXISTS', node_key(node_id)) == 1 then
    redis.call('HSET', node_key(node_id), 'reputation', tostring(rep))
    rescore(node_id, now)
  end
end

-- Can this node take this job now? r = {req_gpu, req_gpu_mem, req_ram, req_labels}.
local function node_can_take(node_id, r, now)
  local n = redis.call('HMGET', node_key(node_id), 'status', 'slots', 'running', 'gpu', 'gpu_memory_mb',
    'ram_mb', 'labels', 'name', 'class', 'health')
  if not n[1] then
    for _, class in ipairs(NODE_CLASSES) do redis.call('ZREM', nodes_free_key(class), node_id) end
    return false
  end
  if n[1] ~= 'online' or (n[10] or '') ~= '' or tonumber(n[3]) >= tonumber(n[2]) then return false end
  -- lapsed, not yet reaped (or silent through an outage and not back yet): no new work
  if tonumber(redis.call('ZSCORE', NODES_DEADLINE, node_id) or '0') < now then return false end
  if tonumber(redis.call('HGET', COOLOFF, n[8]) or '0') > now then return false end
  if r[1] == '1' and n[4] ~= '1' then return false end
  if tonumber(r[2]) > tonumber(n[5]) then return false end
  if tonumber(r[3]) > tonumber(n[6]) then return false end
  if r[4] ~= '{}' then
    local want, have = cjson.decode(r[4]), cjson.decode(n[7])
    for k, v in pairs(want) do
      if have[k] ~= v then return false end
    end
  end
  return true
end

local function job_requirements(job_id)
  return redis.call('HMGET', job_key(job_id), 'req_gpu', 'req_gpu_mem', 'req_ram', 'req_labels')
end

-- Give a queued job to a node: status, slot, the node's job set, and the node's stream entry.
local function assign(job_id, node_id, now)
  local jk = job_key(job_id)
  local j = redis.call('HMGET', jk, 'status', 'attempt', 'spec', 'tenant', 'seq', 'req_gpu')
  set_status(job_id, j[1], 'assigned', j[4], j[5])
  redis.call('HSET', jk, 'node_id', node_id, 'assigned_ms', now, 'node:' .. j[2], node_id, 'last_seq', -1)
  redis.call('ZREM', queue_key(job_class(j[6])), job_id)
  redis.call('HINCRBY', node_key(node_id), 'running', 1)
  redis.call('SADD', node_jobs_key(node_id), job_id)
  redis.call('XADD', node_stream_key(node_id), 'MAXLEN', '~', NODE_STREAM_MAXLEN, '*',
    'job_id', job_id, 'attempt', j[2], 'spec', j[3])
  rescore(node_id, now)
end

-- Best node for a job: the top SCHEDULE_SCAN free nodes of each class it may use, best score first.
-- CPU jobs try CPU nodes first so GPUs stay free for GPU work.
local function place(job_id, now)
  local r = job_requirements(job_id)
  local classes = NODE_CLASSES
  if r[1] == '1' then classes = {'gpu'} end
  for _, class in ipairs(classes) do
    local ids = redis.call('ZREVRANGE', nodes_free_key(class), 0, SCHEDULE_SCAN - 1)
    for _, node_id in ipairs(ids) do
      if node_can_take(node_id, r, now) then
        assign(job_id, node_id, now)
        return node_id
      end
    end
  end
  return false
end

-- Capacity appeared on a node: take the best queued jobs that fit it (priority, then FIFO; jobs
-- that do not fit are skipped, so a big job never blocks small ones behind it).
local function pull_queue(node_id, now)
  local assigned = {}
  local n = redis.call('HMGET', node_key(node_id), 'status', 'slots', 'running', 'class')
  if not n[1] or n[1] ~= 'online' then return assigned end
  local free = tonumber(n[2]) - tonumber(n[3])
  if free <= 0 then return assigned end
  -- a CPU node scans the CPU queue; a GPU node both, merged in queue order
  local candidates = {}
  local classes = {'cpu'}
  if n[4] == 'gpu' then classes = {'cpu', 'gpu'} end
  for _, class in ipairs(classes) do
    local window = redis.call('ZRANGE', queue_key(class), 0, QUEUE_SCAN - 1, 'WITHSCORES')
    for i = 1, #window, 2 do table.insert(candidates, {window[i], tonumber(window[i + 1])}) end
  end
  if #candidates == 0 then return assigned end
  table.sort(candidates, function(a, b) return a[2] < b[2] end)
  for _, candidate in ipairs(candidates) do
    local job_id = candidate[1]
    if node_can_take(node_id, job_requirements(job_id), now) then
      assign(job_id, node_id, now)
      table.insert(assigned, job_id)
      free = free - 1
      if free <= 0 then break end
    end
  end
  return assigned
end

-- A job leaves a node (ended, cancelled, lost or handed back): free its slot.
local remove_node  -- defined below; a draining node that runs its last job out is removed

local function release(job_id, node_id, now)
  if not node_id or node_id == '' then return end
  redis.call('SREM', node_jobs_key(node_id), job_id)
  local nk = node_key(node_id)
  if redis.call('EXISTS', nk) == 1 then
    if tonumber(redis.call('HGET', nk, 'running')) > 0 then redis.call('HINCRBY', nk, 'running', -1) end
    if redis.call('HGET', nk, 'status') == 'draining' and tonumber(redis.call('HGET', nk, 'running')) == 0 then
      remove_node(node_id, now, false)
    else
      rescore(node_id, now)
    end
  end
end

-- Put an assigned/running job back in the queue with attempt + 1. lost = the node failed it, which
-- spends one of max_attempts; a hand-back (draining node) does not. Returns the new status.
local function requeue(job_id, now, lost, reason)
  local jk = job_key(job_id)
  local j = redis.call('HMGET', jk, 'status', 'tenant', 'seq', 'attempt', 'lost_count', 'max_attempts', 'band',
    'req_gpu')
  local lost_count = tonumber(j[5])
  if lost then lost_count = lost_count + 1 end
  redis.call('HSET', jk, 'attempt', tonumber(j[4]) + 1, 'lost_count', lost_count, 'node_id', '')
  if lost_count >= tonumber(j[6]) then
    set_status(job_id, j[1], 'failed', j[2], j[3])
    redis.call('HSET', jk, 'finished_ms', now,
      'error', 'node lost ' .. lost_count .. ' time(s), max_attempts reached: ' .. reason)
    return 'failed'
  end
  set_status(job_id, j[1], 'queued', j[2], j[3])
  redis.call('ZADD', queue_key(job_class(j[8])), tonumber(j[7]) * 1e12 + tonumber(j[3]), job_id)
  return 'queued'
end

-- Remove a node and everything it holds; its live jobs go back to the queue (and are placed again
-- at once where a free node fits). lost = the heartbeat lapsed (the node's fault).
remove_node = function(node_id, now, lost)
  local name = redis.call('HGET', NODE_NAMES, node_id)
  local moved = 0
  for _, job_id in ipairs(redis.call('SMEMBERS', node_jobs_key(node_id))) do
    local j = redis.call('HMGET', job_key(job_id), 'status', 'node_id')
    if (j[1] == 'assigned' or j[1] == 'running') and j[2] == node_id then
      moved = moved + 1
      if requeue(job_id, now, lost, 'heartbeat of node ' .. node_id .. ' lapsed') == 'queued' then
        place(job_id, now)
      end
    end
  end
  redis.call('ZREM', NODES_SCORE, node_id)
  redis.call('ZREM', NODES_DEADLINE, node_id)
  for _, class in ipairs(NODE_CLASSES) do redis.call('ZREM', nodes_free_key(class), node_id) end
  redis.call('DEL', node_key(node_id), node_jobs_key(node_id), node_cancels_key(node_id), node_stream_key(node_id))
  redis.call('HDEL', NODE_NAMES, node_id)
  if name and redis.call('HGET', NODE_BY_NAME, name) == node_id then redis.call('HDEL', NODE_BY_NAME, name) end
  redis.call('SADD', NODE_USERS_TO_DELETE, node_id)  -- its store user goes too (scripts cannot run ACL)
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
local function expire_stale_assignments(node_id, now)
  local resumed = nil
  for _, job_id in ipairs(redis.call('SMEMBERS', node_jobs_key(node_id))) do
    local j = redis.call('HMGET', job_key(job_id), 'status', 'node_id', 'assigned_ms')
    if j[1] == 'assigned' and j[2] == node_id and now - tonumber(j[3]) > ASSIGN_TIMEOUT_MS then
      resumed = resumed or tonumber(redis.call('GET', PLANE_RESUMED) or '0')
      if now - math.max(tonumber(j[3]), resumed) > ASSIGN_TIMEOUT_MS then
        release(job_id, node_id, now)
        local reason = 'node ' .. node_id .. ' did not start it within ' .. (ASSIGN_TIMEOUT_MS / 1000)
          .. ' s of its assignment (it could not read its assignment stream?)'
        adjust_reputation(node_id, redis.call('HGET', NODE_NAMES, node_id), 'node_fault', now)
        if requeue(job_id, now, true, reason) == 'queued' then place(job_id, now) end
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

-- Reaping: nodes whose deadline passed, REAP_BATCH at most per call (every gateway also runs REAP on
-- a timer, so a quiet fleet is reaped too).
local function reap_expired(now)
  plane_pulse(now)
  local reaped = {}
  for _, node_id in ipairs(redis.call('ZRANGEBYSCORE', NODES_DEADLINE, '-inf', now, 'LIMIT', 0, REAP_BATCH)) do
    remove_node(node_id, now, true)
    table.insert(reaped, node_id)
  end
  return reaped
end
"""


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
        f"local TERMINAL = {{{terminal}}}\n"
    )
    return LUA_KEY_BUILDERS + LUA_TRANSITIONS + constants + _HELPERS
