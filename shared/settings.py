"""Settings: one frozen object per process, read once at start from the environment.

A bad value fails fast with the variable's name in the message. Flags of the CLI are applied by
setting these variables before the process (or its workers) start, so every process of one server
sees the same values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


def _read(env: dict[str, str], name: str, default: str) -> str:
    return env.get(name, default)


def _read_float(env: dict[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be >= {minimum}, got {raw!r}")
    return value


def _read_int(env: dict[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be >= {minimum}, got {raw!r}")
    return value


def default_data_dir(env: dict[str, str] | None = None) -> Path:
    """``$CYXWIZ_DATA_DIR``, else ``~/.cyxwiz``."""
    env = dict(os.environ) if env is None else env
    raw = env.get("CYXWIZ_DATA_DIR")
    return Path(raw).expanduser() if raw else Path.home() / ".cyxwiz"


@dataclass(frozen=True)
class ScoreWeights:
    """Weights of the node score; each component is on 0..1, so the score is too (weights sum to 1)."""

    reputation: float = 0.4
    availability: float = 0.3
    capability: float = 0.2
    uptime: float = 0.1


@dataclass(frozen=True)
class Settings:
    """Everything a function process needs, fixed at start."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    heartbeat_interval_s: float = 10.0
    ttl_s: float = 30.0
    weights: ScoreWeights = field(default_factory=ScoreWeights)
    max_body_bytes: int = 1 << 20            # JSON bodies: a job spec is a few KB
    max_artifact_bytes: int = 256 << 20      # per artifact upload
    max_job_artifact_bytes: int = 512 << 20  # all artifacts of one job together
    redis_timeout_s: float = 2.0             # a hung Redis turns into a 503 after this long
    schedule_scan: int = 64                  # nodes looked at per placement, per capability class
    queue_scan: int = 200                    # queued jobs looked at when a node pulls work
    reap_batch: int = 20                     # expired nodes reaped per function call at most
    reputation_floor: float = 0.3            # below this a node cools off (not scheduled)
    cooloff_s: float = 600.0
    assign_timeout_s: float = 120.0          # an assignment its node has not started by then is requeued
    rate_limit_per_s: int = 100              # per API key; 0 turns it off
    max_event_streams: int = 200             # open SSE streams per process ...
    max_event_streams_per_tenant: int = 20   # ... and per tenant in it; past either: 429
    node_store_url: str = ""                 # the store address handed to nodes; "" = derived (store_users)
    reap_interval_s: float = 1.0             # each gateway process reaps lapsed nodes this often
    outage_gap_s: float = 5.0                # no script ran for this long: the control plane was down
    # --- tenants' limits (docs/api.md "Limits") ---
    max_job_memory_mb: int = 65536           # the most memory any node of this cluster may give one job
    max_queued_jobs: int = 1000              # per tenant, unless an admin set the tenant's own
    max_running_jobs: int = 64               # per tenant (assigned + running), unless an admin set the tenant's own
    retention_days: float = 30.0             # finished jobs, their artifacts and unseen node names then go
    max_job_duration_s: float = 7 * 86400.0  # training.max_duration_s may not exceed this (and defaults to it)
    max_artifacts_per_job: int = 32
    # --- multi-node jobs (docs/distributed.md) ---
    max_gang_nodes: int = 16                 # requirements.nodes may be at most this
    gang_reserve_s: float = 60.0             # a gang waiting this long reserves the free nodes it could use
    rendezvous_timeout_s: float = 120.0      # a gang's ranks must all join within this of its placement
    # --- the HTTP edge ---
    body_timeout_s: float = 10.0             # a request body must arrive within this ...
    min_body_rate_bps: int = 16384           # ... plus its size at this rate (large uploads on slow links)
    request_timeout_s: float = 60.0          # a whole request (not streams, uploads or downloads) ends by then
    max_requests_per_client: int = 256       # requests in flight per client address, per gateway process ...
    max_requests: int = 4096                 # ... and in all; past either: 503 and the connection closed
    # --- verification (docs/verification.md) ---
    probation_audits: int = 3                # a new node identity is on probation until this many audits passed
    audit_fraction: float = 0.1              # of trusted nodes' results, this fraction is audited (at least one a day)
    audit_tolerance: float = 0.01            # a replay within this distance (relative to the segment's update) passes
    audit_cross_tolerance: float = 0.5       # ... on another device kind (a new identity no peer can check)
    keep_checkpoints: int = 4                # checkpoints of a job kept as possible audit starts (plus the latest)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        """Read every ``CYXWIZ_*`` variable once; raise :class:`SettingsError` naming a bad one."""
        env = dict(os.environ) if env is None else env
        interval = _read_float(env, "CYXWIZ_HEARTBEAT_INTERVAL_S", 10.0, minimum=0.1)
        ttl = _read_float(env, "CYXWIZ_TTL_S", 3 * interval, minimum=0.1)
        if ttl < interval:
            raise SettingsError(f"CYXWIZ_TTL_S ({ttl}) must be >= CYXWIZ_HEARTBEAT_INTERVAL_S ({interval})")
        # The reaper timer doubles as the control plane's pulse: it must tick several times within
        # the outage threshold, and an outage shorter than a TTL can cost no node its registration.
        reap_interval = _read_float(env, "CYXWIZ_REAP_INTERVAL_S", min(1.0, interval / 2), minimum=0.05)
        outage_gap = _read_float(env, "CYXWIZ_OUTAGE_GAP_S", max(5 * reap_interval, min(5.0, ttl)), minimum=0.1)
        if outage_gap < 2 * reap_interval:
            raise SettingsError(f"CYXWIZ_OUTAGE_GAP_S ({outage_gap}) must be >= 2 x CYXWIZ_REAP_INTERVAL_S "
                                f"({reap_interval})")
        weights = ScoreWeights(
            reputation=_read_float(env, "CYXWIZ_WEIGHT_REPUTATION", 0.4),
            availability=_read_float(env, "CYXWIZ_WEIGHT_AVAILABILITY", 0.3),
            capability=_read_float(env, "CYXWIZ_WEIGHT_CAPABILITY", 0.2),
            uptime=_read_float(env, "CYXWIZ_WEIGHT_UPTIME", 0.1),
        )
        total = weights.reputation + weights.availability + weights.capability + weights.uptime
        if abs(total - 1.0) > 1e-6:
            raise SettingsError(f"CYXWIZ_WEIGHT_* must sum to 1, got {total}")
        # a gang's nodes are found among the top CYXWIZ_SCHEDULE_SCAN free nodes of a class: a larger gang
        # could never be placed
        schedule_scan = _read_int(env, "CYXWIZ_SCHEDULE_SCAN", 64, minimum=1)
        max_gang_nodes = _read_int(env, "CYXWIZ_MAX_GANG_NODES", 16, minimum=1)
        if max_gang_nodes > schedule_scan:
            raise SettingsError(f"CYXWIZ_MAX_GANG_NODES ({max_gang_nodes}) must be <= CYXWIZ_SCHEDULE_SCAN "
                                f"({schedule_scan}): placement looks for a gang's nodes among that many free "
                                "nodes of a class")
        return cls(
            redis_url=_read(env, "CYXWIZ_REDIS_URL", "redis://127.0.0.1:6379/0"),
            heartbeat_interval_s=interval,
            ttl_s=ttl,
            weights=weights,
            max_body_bytes=_read_int(env, "CYXWIZ_MAX_BODY_BYTES", 1 << 20, minimum=1024),
            max_artifact_bytes=_read_int(env, "CYXWIZ_MAX_ARTIFACT_BYTES", 256 << 20, minimum=1),
            max_job_artifact_bytes=_read_int(env, "CYXWIZ_MAX_JOB_ARTIFACT_BYTES", 512 << 20, minimum=1),
            redis_timeout_s=_read_float(env, "CYXWIZ_REDIS_TIMEOUT_S", 2.0, minimum=0.05),
            schedule_scan=schedule_scan,
            queue_scan=_read_int(env, "CYXWIZ_QUEUE_SCAN", 200, minimum=1),
            reap_batch=_read_int(env, "CYXWIZ_REAP_BATCH", 20, minimum=1),
            reputation_floor=_read_float(env, "CYXWIZ_REPUTATION_FLOOR", 0.3),
            cooloff_s=_read_float(env, "CYXWIZ_COOLOFF_S", 600.0),
            assign_timeout_s=_read_float(env, "CYXWIZ_ASSIGN_TIMEOUT_S", 120.0, minimum=1.0),
            rate_limit_per_s=_read_int(env, "CYXWIZ_RATE_LIMIT_PER_S", 100),
            max_event_streams=_read_int(env, "CYXWIZ_MAX_EVENT_STREAMS", 200, minimum=1),
            max_event_streams_per_tenant=_read_int(env, "CYXWIZ_MAX_EVENT_STREAMS_PER_TENANT", 20, minimum=1),
            node_store_url=_read(env, "CYXWIZ_NODE_STORE_URL", ""),
            reap_interval_s=reap_interval,
            outage_gap_s=outage_gap,
            max_job_memory_mb=_read_int(env, "CYXWIZ_MAX_JOB_MEMORY_MB", 65536, minimum=64),
            max_queued_jobs=_read_int(env, "CYXWIZ_MAX_QUEUED_JOBS", 1000, minimum=1),
            max_running_jobs=_read_int(env, "CYXWIZ_MAX_RUNNING_JOBS", 64, minimum=1),
            retention_days=_read_float(env, "CYXWIZ_RETENTION_DAYS", 30.0, minimum=1e-6),
            max_job_duration_s=_read_float(env, "CYXWIZ_MAX_JOB_DURATION_S", 7 * 86400.0, minimum=1.0),
            max_artifacts_per_job=_read_int(env, "CYXWIZ_MAX_ARTIFACTS_PER_JOB", 32, minimum=2),
            max_gang_nodes=max_gang_nodes,
            gang_reserve_s=_read_float(env, "CYXWIZ_GANG_RESERVE_S", 60.0, minimum=0.0),
            rendezvous_timeout_s=_read_float(env, "CYXWIZ_RENDEZVOUS_TIMEOUT_S", 120.0, minimum=1.0),
            body_timeout_s=_read_float(env, "CYXWIZ_BODY_TIMEOUT_S", 10.0, minimum=0.1),
            min_body_rate_bps=_read_int(env, "CYXWIZ_MIN_BODY_RATE_BPS", 16384, minimum=1),
            request_timeout_s=_read_float(env, "CYXWIZ_REQUEST_TIMEOUT_S", 60.0, minimum=1.0),
            max_requests_per_client=_read_int(env, "CYXWIZ_MAX_REQUESTS_PER_CLIENT", 256, minimum=1),
            max_requests=_read_int(env, "CYXWIZ_MAX_REQUESTS", 4096, minimum=1),
            probation_audits=_read_int(env, "CYXWIZ_PROBATION_AUDITS", 3),
            audit_fraction=min(1.0, _read_float(env, "CYXWIZ_AUDIT_FRACTION", 0.1)),
            audit_tolerance=_read_float(env, "CYXWIZ_AUDIT_TOLERANCE", 0.01),
            audit_cross_tolerance=_read_float(env, "CYXWIZ_AUDIT_CROSS_TOLERANCE", 0.5),
            keep_checkpoints=_read_int(env, "CYXWIZ_KEEP_CHECKPOINTS", 4, minimum=1),
        )
