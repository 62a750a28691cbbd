"""Every Redis key CyxWiz uses, built in this one module.

No other file spells a key: Python code calls these functions, and the Lua scripts get the same
builders from :data:`LUA_KEY_BUILDERS`, generated below from the same prefixes. docs/redis-keys.md
mirrors this module for people inspecting state with ``redis-cli``.

The deployment is one Redis (>= 6.2) or Valkey instance: scripts touch keys they derive at run time,
which a Redis Cluster would not allow.
"""

from __future__ import annotations

PREFIX = "cyxwiz:"

# --- nodes -----------------------------------------------------------------------------------
NODE = PREFIX + "node:"


def node_key(node_id: str) -> str:
    """Hash: one live node. No Redis TTL: liveness is its entry in :data:`NODES_DEADLINE`, so a
    control-plane outage (when no heartbeat can land) does not delete the node and its session."""
    return NODE + node_id


def node_jobs_key(node_id: str) -> str:
    """Set: job ids assigned to or running on the node. No TTL: it must outlive the node hash,
    so the reaper can requeue a dead node's jobs."""
    return NODE + node_id + ":jobs"


def node_cancels_key(node_id: str) -> str:
    """Set: ids of the node's jobs that users cancelled, handed out (and cleared) by its next heartbeat."""
    return NODE + node_id + ":cancels"


def node_stream_key(node_id: str) -> str:
    """Stream: the node's assignments (job_id, attempt, spec). Trimmed by MAXLEN ~ on every add."""
    return NODE + node_id + ":assignments"


# Consumer group of every assignment stream; one consumer per node runtime process.
NODE_GROUP = "cyxwiz-node"
# Assignment streams keep about this many entries; a node holds at most `slots` live ones.
NODE_STREAM_MAXLEN = 1000

NODES_SCORE = PREFIX + "nodes:score"        # ZSET node_id -> score: the score board of live nodes
NODES_DEADLINE = PREFIX + "nodes:deadline"  # ZSET node_id -> ms when its TTL lapses: the reaper's to-do list


def nodes_free_key(node_class: str) -> str:
    """ZSET node_id -> score, only schedulable nodes (online, a free slot, not cooling off), one set
    per capability class (``cpu``, ``gpu``) so placement reads a short top-of-set, not the fleet."""
    return PREFIX + "nodes:free:" + node_class


NODE_CLASSES = ("cpu", "gpu")

# HASH node_id -> name: outlives the node hash, so a reaped node's reputation can still move
NODE_NAMES = PREFIX + "nodes:names"
# HASH node name -> sha256(node_key): the identity that owns a name. Only the holder of the node_key
# may register that name again, so reputation, cool-off and bans (keyed by name) follow the identity.
NODE_IDENTITIES = PREFIX + "nodes:identities"
# HASH node name -> node_id of its live registration: a second live registration of a name is refused
NODE_BY_NAME = PREFIX + "nodes:by_name"
REPUTATION = PREFIX + "reputation"  # HASH node name (identity) -> reputation 0..1; survives re-registration
COOLOFF = PREFIX + "cooloff"        # HASH node name (identity) -> ms until which the node is not scheduled
# SET node ids removed by a script whose store ACL user is still to be deleted (scripts cannot run ACL
# commands); every gateway's reaper timer deletes them within a tick
NODE_USERS_TO_DELETE = PREFIX + "nodes:acl_delete"
# STRING ms of the last script run: the control plane's pulse. A gap longer than the outage threshold
# means the plane was down, and nodes that were alive when it went silent get a fresh TTL
PLANE_PULSE = PREFIX + "plane:pulse"
PLANE_RESUMED = PREFIX + "plane:resumed"  # STRING ms when the plane last came back from such a gap

# --- jobs ------------------------------------------------------------------------------------
JOB = PREFIX + "job:"


def job_key(job_id: str) -> str:
    """Hash: one job, its spec, status, attempt and latest progress. No TTL: jobs are the record."""
    return JOB + job_id


def job_progress_key(job_id: str) -> str:
    """Stream: the job's progress reports, oldest first, capped at :data:`PROGRESS_MAXLEN`."""
    return JOB + job_id + ":progress"


PROGRESS_MAXLEN = 2000  # a long job keeps its latest reports; the job hash keeps the newest one


def artifact_key(job_id: str, name: str) -> str:
    """Hash: one artifact: ``size``, ``chunk_size``, ``chunks``, then chunk fields ``0``, ``1``, ..."""
    return JOB + job_id + ":artifact:" + name


def artifact_upload_key(job_id: str, name: str, upload_id: str) -> str:
    """Hash: an artifact being uploaded; renamed onto :func:`artifact_key` when whole. TTL 1 h so a
    broken upload cleans itself up."""
    return JOB + job_id + ":upload:" + name + ":" + upload_id


UPLOAD_TTL_S = 3600


def job_uploads_key(job_id: str) -> str:
    """Hash: the job's uploads in flight, artifact name -> ``upload_id|bytes|expiry_ms``. Each reserves
    its declared size against the job's artifact cap when it starts; one upload per name at a time.
    An entry past its expiry (a gateway that died mid-upload) no longer counts."""
    return JOB + job_id + ":uploads"


def queue_key(job_class: str) -> str:
    """ZSET job_id -> priority band * 1e12 + sequence (lowest first): every placeable queued job of one
    class, ``cpu`` (any node) or ``gpu`` (GPU nodes only). Counts and "is a higher band waiting?"
    read it; nodes pull from the per-tenant queues below."""
    return PREFIX + "queue:" + job_class


def tenant_queue_key(job_class: str, tenant: str) -> str:
    """ZSET job_id -> the same score: one tenant's placeable queued jobs of one class."""
    return PREFIX + "queue:" + job_class + ":t:" + tenant


def queue_tenants_key(job_class: str) -> str:
    """ZSET tenant -> score of its best queued job of the class: whose queues a free node looks at."""
    return PREFIX + "queue:" + job_class + ":tenants"


# ZSET job_id -> score: queued jobs that no live node could ever hold (labels, memory, GPU); out of every
# scan until a node that fits registers. Their pending_reason is no_node_fits.
QUEUE_PARKED = PREFIX + "queue:parked"
# ZSET job_id -> queue score: the queued multi-node jobs (gangs, requirements.nodes > 1), also in their class
# and tenant queues. Free nodes never take them one by one; placement takes a gang's nodes all at once
# (docs/distributed.md).
QUEUE_GANGS = PREFIX + "queue:gangs"
# HASH node profile (JSON: gpu, gpu_mem, ram, mem, labels) -> live nodes with it: "does any node fit?"
NODES_PROFILES = PREFIX + "nodes:profiles"
# ZSET node name -> ms it was last registered or removed; names unseen for the retention period (and not
# live) are forgotten: reputation, cool-off and identity
NODES_LAST_SEEN = PREFIX + "nodes:last_seen"
def sweep_cursor_key(set_key: str) -> str:
    """String: the score where the reaper timer's sweep of a queue set (a class queue, or the parked
    set) goes on next tick; absent: from the start."""
    return set_key + ":cursor"


def job_states_key(job_id: str) -> str:
    """Hash: the job's provenance, state id -> JSON. A state is a point of training the control plane
    recorded: ``a{attempt}s{step}`` a checkpoint (digests of its weights and optimizer state, position,
    thread count, device kind, the node and attempt that produced it, its ``prev`` state, and the
    artifact holding its bytes while kept), ``a{attempt}final`` the final weights, ``c{attempt}s{step}``
    a digest the node committed to in a progress report. Following ``prev`` from the final state back to
    "" (the seed's initial weights) gives the chain an audit draws its segment from."""
    return JOB + job_id + ":states"


def job_rendezvous_key(job_id: str) -> str:
    """Hash: the rendezvous of a gang's current attempt (docs/distributed.md): ``attempt``, ``master``
    (host:port of rank 0's c10d store), ``arrived:{rank}`` and ``ready:{rank}`` (ms), ``peer:{rank}`` (ms
    the rank reported that it lost a peer). Reset each time the gang is placed."""
    return JOB + job_id + ":rendezvous"


def checkpoint_artifact_name(attempt: int | str, step: int | str) -> str:
    """The artifact a checkpoint upload is kept under (``checkpoint.safetensors`` names the latest)."""
    return f"checkpoint-a{attempt}-s{step}.safetensors"


# --- verification ------------------------------------------------------------------------------
VERIFY = PREFIX + "verify:"


def verify_key(task_id: str) -> str:
    """Hash: one verification task (ids ``v-...``): job, round, the segment's states (``from``, ``to``),
    the artifacts to start from and compare with, thread count and device kind to replay with, the
    producer and the names excluded as verifiers, status (queued/assigned), node and attempt."""
    return VERIFY + task_id


VERIFY_QUEUE = PREFIX + "verify:queue"  # ZSET task_id -> ms queued: tasks waiting for a verifier


def node_tasks_key(node_id: str) -> str:
    """Set: the verification tasks a node holds (each takes one of its slots)."""
    return NODE + node_id + ":tasks"


NODES_BANNED = PREFIX + "nodes:banned"      # HASH node name -> why: slashed identities; they cannot register
NODES_AUDITS = PREFIX + "nodes:audits"      # HASH "{name}:passed" / "{name}:failed" / "{name}:last_ms" -> number
NODES_OBSERVED = PREFIX + "nodes:observed"  # HASH node name -> capability 0..1 from audited throughput
NODES_FLAGS = PREFIX + "nodes:flags"        # HASH node name -> why its claims were doubted (observed << claimed)
NODES_KINDS = PREFIX + "nodes:kinds"        # HASH device kind -> live nodes of it (is a verifier possible?)


def node_results_key(name: str) -> str:
    """ZSET job_id -> ms: completed jobs that rest on work of this node identity no audit checked;
    re-checked if the identity is ever slashed."""
    return PREFIX + "nodes:results:" + name


def job_logs_key(job_id: str, attempt: int | str) -> str:
    """Stream: one attempt's log lines (the job process's output and the training loop's own lines),
    field ``line``, ``MAXLEN ~`` :data:`LOG_MAXLEN`; purged with the job."""
    return JOB + job_id + ":logs:" + str(attempt)


LOG_MAXLEN = 5000  # lines kept per attempt (the newest); each line is cut to 2,000 characters

# HASH of counters the scripts keep, for /metrics (functions are stateless, so cluster totals live in the
# store): jobs_submitted, jobs_finished:{status}, reassignments, nodes_reaped
STATS = PREFIX + "stats"

JOBS_FINISHED = PREFIX + "retention:jobs"  # ZSET job_id -> ms it ended: purged after the retention period
JOBS_DEADLINE = PREFIX + "deadline:jobs"  # ZSET job_id -> ms by which it must end (training.max_duration_s)


def tenant_key(tenant: str) -> str:
    """Hash: an admin's limits for one tenant (``max_queued_jobs``, ``max_running_jobs``; absent fields
    take the settings' defaults) and ``gang_extra_slots``, the node slots its multi-node jobs hold beyond
    one each, counted toward ``max_running_jobs`` (kept by the scripts)."""
    return PREFIX + "tenant:" + tenant
JOB_SEQ = PREFIX + "seq:jobs"  # STRING counter: creation order; also the listing cursor


def jobs_index_key(tenant: str | None = None, status: str | None = None) -> str:
    """ZSET job_id -> creation sequence, for listing newest first.

    One set per (tenant or all) x (status or any): ``cyxwiz:jobs:{tenant|*}:{status|*}``.
    """
    return PREFIX + "jobs:" + (tenant or "*") + ":" + (status or "*")


def idempotency_key(tenant: str, key: str) -> str:
    """String: job id created under an ``Idempotency-Key`` header. TTL 24 h, as payment APIs do."""
    return PREFIX + "idem:" + tenant + ":" + key


IDEMPOTENCY_TTL_S = 86400

# --- auth ------------------------------------------------------------------------------------
API_KEYS = PREFIX + "auth:api_keys"  # HASH sha256(key) -> JSON {"tenant", "admin", "created", "key_id"}
API_KEY_IDS = PREFIX + "auth:key_ids"  # HASH key_id -> sha256(key): list and revoke keys without ever showing them
JOIN_TOKENS = PREFIX + "auth:join_tokens"  # HASH sha256(token) -> created-at; any entry may register
TENANTS = PREFIX + "tenants"  # SET tenant names that have a key


def rate_key(key_hash: str, second: int) -> str:
    """String counter of one API key's requests in one second. TTL 2 s."""
    return PREFIX + "rate:" + key_hash + ":" + str(second)


# --- Lua -------------------------------------------------------------------------------------
# The same builders for Lua scripts, so key spelling stays in this module.
LUA_KEY_BUILDERS = f"""
local K_NODE = '{NODE}'
local function node_key(id) return K_NODE .. id end
local function node_jobs_key(id) return K_NODE .. id .. ':jobs' end
local function node_cancels_key(id) return K_NODE .. id .. ':cancels' end
local function node_stream_key(id) return K_NODE .. id .. ':assignments' end
local function nodes_free_key(class) return '{PREFIX}nodes:free:' .. class end
local NODES_SCORE = '{NODES_SCORE}'
local NODES_DEADLINE = '{NODES_DEADLINE}'
local NODE_CLASSES = {{'cpu', 'gpu'}}
local NODE_GROUP = '{NODE_GROUP}'
local NODE_STREAM_MAXLEN = {NODE_STREAM_MAXLEN}
local NODE_NAMES = '{NODE_NAMES}'
local NODE_IDENTITIES = '{NODE_IDENTITIES}'
local NODE_BY_NAME = '{NODE_BY_NAME}'
local NODE_USERS_TO_DELETE = '{NODE_USERS_TO_DELETE}'
local PLANE_PULSE = '{PLANE_PULSE}'
local PLANE_RESUMED = '{PLANE_RESUMED}'
local REPUTATION = '{REPUTATION}'
local COOLOFF = '{COOLOFF}'
local K_JOB = '{JOB}'
local function job_key(id) return K_JOB .. id end
local function job_progress_key(id) return K_JOB .. id .. ':progress' end
local function job_uploads_key(id) return K_JOB .. id .. ':uploads' end
local function artifact_key(id, name) return K_JOB .. id .. ':artifact:' .. name end
local function tenant_queue_key(class, tenant) return '{PREFIX}queue:' .. class .. ':t:' .. tenant end
local function queue_tenants_key(class) return '{PREFIX}queue:' .. class .. ':tenants' end
local QUEUE_PARKED = '{QUEUE_PARKED}'
-- multi-node jobs: keys, settings and functions in one table (Lua allows a chunk 200 locals)
local GANG = {{QUEUE = '{QUEUE_GANGS}'}}
function GANG.rendezvous_key(id) return K_JOB .. id .. ':rendezvous' end
local NODES_PROFILES = '{NODES_PROFILES}'
local NODES_LAST_SEEN = '{NODES_LAST_SEEN}'
local JOBS_FINISHED = '{JOBS_FINISHED}'
local JOBS_DEADLINE = '{JOBS_DEADLINE}'
local function tenant_key(tenant) return '{PREFIX}tenant:' .. tenant end
local function sweep_cursor_key(set_key) return set_key .. ':cursor' end
local PROGRESS_MAXLEN = {PROGRESS_MAXLEN}
local function queue_key(class) return '{PREFIX}queue:' .. class end
local function job_class(req_gpu) if req_gpu == '1' then return 'gpu' end return 'cpu' end
local JOB_SEQ = '{JOB_SEQ}'
local function jobs_index_key(tenant, status) return '{PREFIX}jobs:' .. (tenant or '*') .. ':' .. (status or '*') end
local function idempotency_key(tenant, key) return '{PREFIX}idem:' .. tenant .. ':' .. key end
local IDEMPOTENCY_TTL_S = {IDEMPOTENCY_TTL_S}
local function job_states_key(id) return K_JOB .. id .. ':states' end
local function checkpoint_artifact_name(attempt, step)
  return 'checkpoint-a' .. attempt .. '-s' .. step .. '.safetensors'
end
local function verify_key(id) return '{VERIFY}' .. id end
local VERIFY_QUEUE = '{VERIFY_QUEUE}'
local function node_tasks_key(id) return K_NODE .. id .. ':tasks' end
local NODES_BANNED = '{NODES_BANNED}'
local NODES_AUDITS = '{NODES_AUDITS}'
local NODES_OBSERVED = '{NODES_OBSERVED}'
local NODES_FLAGS = '{NODES_FLAGS}'
local NODES_KINDS = '{NODES_KINDS}'
local function node_results_key(name) return '{PREFIX}nodes:results:' .. name end
local STATS = '{STATS}'
local function job_logs_key(id, attempt) return K_JOB .. id .. ':logs:' .. attempt end
"""
