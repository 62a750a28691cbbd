"""Job operations: submit (with immediate placement), read, list, cancel, progress reports.

Validation happens here, before any state is touched; every change is one Lua script
(:mod:`shared.lua`), so a rejected request changes nothing and concurrent requests cannot interleave.
"""

from __future__ import annotations

import math
import re
import secrets
import time
import uuid
from typing import Any

import msgspec
import orjson

from shared import errors, keys, resources
from shared.auth import TENANT_RE, Principal
from shared.jobspec import known_data_info, parse_job_spec
from shared.store import Store
from shared.transitions import JOB_STATUSES, PRIORITY_BANDS, PRIORITY_SCALE, TERMINAL
from shared.validation import convert, is_number
from shared.views import job_view, rfc3339

MAX_IDEMPOTENCY_KEY = 255


MAX_ERROR_CHARS = 4000  # of a failure's error, on the job hash and in its progress event alike
MAX_PROGRESS_COUNT = 2**53  # epoch, step, total_steps: above this a double (Lua, JavaScript) loses integers
MAX_METRICS = 64
METRIC_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]{0,63}")  # with fullmatch: 1-64 characters
_FRACTION_METRIC_RE = re.compile(r"(?:^|[^a-z])acc(?:uracy)?(?:[^a-z]|$)")  # acc, val_accuracy, top5_acc


DIGEST_RE = re.compile(r"[0-9a-f]{64}")  # with fullmatch: a hex SHA-256


class Commitment(msgspec.Struct, forbid_unknown_fields=True):
    """Digests of a checkpoint the node took at ``step``, sent in the progress report before anyone knows
    which segment an audit will replay; an upload of that checkpoint must match them."""

    step: int
    weights: str
    optimizer: str = ""
    data: str = ""


class ProgressReport(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /v1/jobs/{id}/progress. ``status`` "queued" hands the job back (a draining node);
    ``fault`` says whether a failure was the job's (bad data: not retried) or the node's (retried)."""

    attempt: int
    seq: int
    status: str = "running"
    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    metrics: dict[str, float | int | None] = {}
    artifacts: list[str] = []
    error: str = ""
    fault: str = "job"
    commitment: Commitment | None = None


REPORT_STATUSES = ("running", "completed", "failed", "queued")


def _check_progress(report: ProgressReport) -> None:
    """Sanity rules for what a report says (422 naming the field): counts are whole and plausible,
    ``step`` is within ``total_steps`` when that is known, metrics are few, simply named and finite,
    accuracies are fractions and losses are not negative. None is a metric that could not be measured."""
    for name in ("epoch", "step", "total_steps"):
        value = getattr(report, name)
        if not 0 <= value <= MAX_PROGRESS_COUNT:
            raise errors.InvalidField(f"{name} must be between 0 and 2**53", field=name)
    if report.total_steps > 0 and report.step > report.total_steps:
        raise errors.InvalidField(f"step ({report.step}) is past total_steps ({report.total_steps})", field="step")
    if len(report.metrics) > MAX_METRICS:
        raise errors.InvalidField(f"at most {MAX_METRICS} metrics", field="metrics")
    for name, value in report.metrics.items():
        if not METRIC_NAME_RE.fullmatch(name):
            raise errors.InvalidField("metric names are 1-64 of A-Z, a-z, 0-9, '_', '.', '/' and '-', starting "
                                      "with a letter or '_'", field="metrics")
        if value is None:
            continue
        field = f"metrics.{name}"
        if not math.isfinite(value):
            raise errors.InvalidField(f"{field} must be a finite number or null", field=field)
        if _FRACTION_METRIC_RE.search(name.lower()) and not 0 <= value <= 1:
            raise errors.InvalidField(f"{field} is an accuracy: it must be between 0 and 1", field=field)
        if name.lower().endswith("loss") and value < 0:
            raise errors.InvalidField(f"{field} is a loss: it must be >= 0", field=field)


async def submit_job(store: Store, who: Principal, body: Any,
                     idempotency_key: str | None) -> tuple[int, dict[str, Any]]:
    """Create a job and place it on the best node that fits, or queue it. 201, or 200 for a repeat
    of an Idempotency-Key."""
    settings = store.settings
    spec = parse_job_spec(body, max_duration_s=settings.max_job_duration_s, max_nodes=settings.max_gang_nodes)
    need = resources.estimate(spec, known_data_info(spec["dataset"]))
    if need.memory_mb > settings.max_job_memory_mb:
        raise errors.InvalidField(
            f"the job needs about {need.memory_mb:,} MiB of memory ({need.parts()}, plus a margin), more than "
            f"any node of this cluster gives one job ({settings.max_job_memory_mb:,} MiB); {need.driver} drives "
            "it: make it smaller", field=need.driver)
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
        raise errors.InvalidField(f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} characters",
                                  field="Idempotency-Key")
    req = spec["requirements"]
    if req["nodes"] > 1:
        # a gang holds one slot per node toward its tenant's running limit: one larger than the limit never runs
        own = await store.redis.hget(keys.tenant_key(who.tenant), "max_running_jobs")
        limit = int(own) if own is not None else settings.max_running_jobs
        if req["nodes"] > limit:
            raise errors.InvalidField(
                f"requirements.nodes is {req['nodes']}, more than tenant {who.tenant} may hold at once "
                f"(max_running_jobs {limit}; each node of a multi-node job counts)", field="requirements.nodes")
    job_id = "j-" + uuid.uuid4().hex[:20]
    reply = await store.run("SUBMIT_JOB", [
        job_id, who.tenant, idempotency_key or "", spec["name"], spec["priority"],
        PRIORITY_BANDS[spec["priority"]], spec["max_attempts"], orjson.dumps(spec).decode(),
        int(bool(req["gpu"])), req["min_gpu_memory_mb"], req["min_ram_mb"],
        orjson.dumps(req["labels"], option=orjson.OPT_SORT_KEYS).decode(),
        need.memory_mb, int(spec["training"]["max_duration_s"] * 1000), settings.max_queued_jobs,
        req["nodes"],
    ])
    kind, job_id, status, node_id = reply
    answer = {"job_id": job_id, "status": status, "node_id": node_id or None}
    return (200 if kind == "existing" else 201), answer


async def _job_hash(store: Store, who: Principal, job_id: str) -> dict[str, str]:
    found = await store.redis.hgetall(keys.job_key(job_id))
    if not found or (not who.admin and found["tenant"] != who.tenant):
        raise errors.NotFound(f"no job {job_id}")  # another tenant's job looks like no job at all
    return found  # type: ignore[no-any-return]


def draw() -> float:
    """Uniform in [0, 1) from the OS's generator: which result is audited, and which segment, must not
    be predictable by the node that trained it."""
    return secrets.randbelow(2**53) / 2**53


async def get_job(store: Store, who: Principal, job_id: str) -> dict[str, Any]:
    found = await _job_hash(store, who, job_id)
    view = job_view(found, await pending_reasons(store, [found]))
    view["checkpoints"] = await provenance(store, job_id)
    return view


async def provenance(store: Store, job_id: str) -> list[dict[str, Any]]:
    """Every checkpoint and final weights the control plane recorded for the job, oldest first: the
    attempt and node that produced each, its position and digest, and whether its bytes are kept."""
    states = await store.redis.hgetall(keys.job_states_key(job_id))
    found = []
    for state_id, raw in states.items():
        if state_id.startswith("c"):
            continue  # a digest committed in a report; the checkpoint itself, if uploaded, is listed
        s = orjson.loads(raw)
        found.append({"state": state_id, "attempt": s.get("attempt"), "node_id": s.get("node_id"),
                      "node": s.get("node") or None, "step": s.get("step"), "epoch": s.get("epoch"),
                      "final": bool(s.get("final")), "weights_digest": s.get("weights"),
                      "artifact": s.get("artifact") or None, "from": s.get("prev") or None,
                      "recorded_at": rfc3339(s.get("ms"))})
    return sorted(found, key=lambda s: (s["step"] or 0, s["attempt"] or 0, s["final"]))


async def pending_reasons(store: Store, hashes: list[dict[str, str]]) -> dict[str, str]:
    """Why each queued job of ``hashes`` waits, like Slurm's reason codes: ``no_node_fits`` (parked: no
    live node could hold it), ``tenant_limit`` (its tenant's slots, one per node of a gang, plus the job's
    own would pass max_running_jobs), ``gang`` (a multi-node job waiting for its nodes free at once),
    ``priority`` (a job of a higher priority band waits for the same class of node), else
    ``waiting_for_capacity``."""
    queued = [h for h in hashes if h.get("status") == "queued"]
    if not queued:
        return {}
    tenants = sorted({h["tenant"] for h in queued})
    async with store.redis.pipeline(transaction=False) as pipe:
        for h in queued:
            pipe.zscore(keys.QUEUE_PARKED, h["job_id"])
            pipe.zcount(keys.queue_key("gpu" if h.get("req_gpu") == "1" else "cpu"), "-inf",
                        f"({int(h['band']) * PRIORITY_SCALE}")
        for tenant in tenants:
            pipe.zcard(keys.jobs_index_key(tenant, "assigned"))
            pipe.zcard(keys.jobs_index_key(tenant, "running"))
            pipe.hmget(keys.tenant_key(tenant), ["max_running_jobs", "gang_extra_slots"])
        answers = await pipe.execute()
    per_job, per_tenant = answers[:2 * len(queued)], answers[2 * len(queued):]
    room = {}  # slots each tenant may still take
    for index, tenant in enumerate(tenants):
        assigned, running, (limit, gang_extra) = per_tenant[3 * index:3 * index + 3]
        limit = int(limit) if limit is not None else store.settings.max_running_jobs
        room[tenant] = limit - (assigned + running + int(gang_extra or 0))
    reasons = {}
    for index, h in enumerate(queued):
        parked, ahead = per_job[2 * index], per_job[2 * index + 1]
        if parked is not None:
            reasons[h["job_id"]] = "no_node_fits"
        elif room[h["tenant"]] < int(h.get("gang") or 1):
            reasons[h["job_id"]] = "tenant_limit"
        elif int(h.get("gang") or 1) > 1:
            reasons[h["job_id"]] = "gang"  # waits for requirements.nodes nodes free at once
        elif ahead:
            reasons[h["job_id"]] = "priority"
        else:
            reasons[h["job_id"]] = "waiting_for_capacity"
    return reasons


async def check_job_visible(store: Store, who: Principal, job_id: str) -> None:
    """404 unless this principal may see the job."""
    tenant = await store.redis.hget(keys.job_key(job_id), "tenant")
    if tenant is None or (not who.admin and tenant != who.tenant):
        raise errors.NotFound(f"no job {job_id}")


def _list_args(status: str | None, limit: str | None, cursor: str | None) -> tuple[str | None, int, str]:
    if status is not None and status not in JOB_STATUSES:
        raise errors.InvalidField(f"status must be one of {', '.join(JOB_STATUSES)}", field="status")
    if limit is not None and not is_number(limit):
        raise errors.InvalidField("limit must be an integer", field="limit")
    count = 50 if limit is None else int(limit) if len(limit) <= 4 else 0  # no int() of 4000 digits
    if not 1 <= count <= 500:
        raise errors.InvalidField("limit must be between 1 and 500", field="limit")
    # a cursor is a job's sequence number (a double in the index): anything past 2**53 was never one
    if cursor is not None and (not is_number(cursor) or len(cursor) > 16 or int(cursor) > 2**53):
        raise errors.InvalidField("cursor must be a value of next_cursor", field="cursor")
    return status, count, f"({cursor}" if cursor else "+inf"


async def list_jobs(store: Store, who: Principal, status: str | None, limit: str | None,
                    cursor: str | None, tenant: str | None = None) -> dict[str, Any]:
    """Newest first, one page; ``next_cursor`` continues after the last job shown. ``tenant`` narrows an
    admin's listing to one tenant; a tenant's key may name only its own tenant (another is 403)."""
    status, count, top = _list_args(status, limit, cursor)
    if tenant is not None and not TENANT_RE.fullmatch(tenant):
        raise errors.InvalidField("tenant must be 1-63 of a-z, 0-9, '_' and '-'", field="tenant")
    if tenant is not None and not who.admin and tenant != who.tenant:
        raise errors.Forbidden("only an admin API key may list another tenant's jobs")
    index = keys.jobs_index_key(tenant if who.admin else who.tenant, status)
    page = await store.redis.zrevrangebyscore(index, top, "-inf", start=0, num=count, withscores=True)
    async with store.redis.pipeline(transaction=False) as pipe:
        for job_id, _ in page:
            pipe.hgetall(keys.job_key(job_id))
        hashes = await pipe.execute()
    found = [h for h in hashes if h]
    reasons = await pending_reasons(store, found)
    jobs = [job_view(h, reasons) for h in found]
    next_cursor = str(int(page[-1][1])) if len(page) == count else None
    return {"jobs": jobs, "next_cursor": next_cursor}


async def cancel_job(store: Store, who: Principal, job_id: str) -> dict[str, Any]:
    """Cancel a job; its node hears of it on its next heartbeat or progress report. 409 if terminal."""
    reply = await store.run("CANCEL_JOB", [job_id, who.scope()])
    if reply[0] == "terminal":
        raise errors.Conflict(f"job {job_id} is already {reply[1]}", code="job_terminal")
    return await get_job(store, who, job_id)


async def report_progress(store: Store, node_id: str, job_id: str, body: Any, token_hash: str = "") -> dict[str, Any]:
    """Record a node's progress report: idempotent by (attempt, seq), fenced by attempt. With
    ``token_hash`` the script itself checks the node's session token first (401, nothing changed)."""
    report = convert(body, ProgressReport)
    if report.status not in REPORT_STATUSES:
        raise errors.InvalidField(f"status must be one of {', '.join(REPORT_STATUSES)}", field="status")
    if report.fault not in ("job", "node", "peer"):
        raise errors.InvalidField("fault must be 'job', 'node' or 'peer'", field="fault")
    if report.attempt < 1 or report.seq < 0:
        raise errors.InvalidField("attempt must be >= 1 and seq >= 0", field="attempt" if report.attempt < 1 else "seq")
    if report.status == "failed" and not report.error:
        raise errors.InvalidField("a failed report needs an error", field="error")
    _check_progress(report)
    commitment = ""
    if report.commitment is not None:
        c = report.commitment
        for name in ("weights", "optimizer", "data"):
            value = getattr(c, name)
            if (value or name == "weights") and not DIGEST_RE.fullmatch(value):
                raise errors.InvalidField("a digest is 64 lowercase hex characters", field=f"commitment.{name}")
        if not 0 <= c.step <= MAX_PROGRESS_COUNT:
            raise errors.InvalidField("step must be between 0 and 2**53", field="commitment.step")
        commitment = orjson.dumps({"step": c.step, "weights": c.weights, "optimizer": c.optimizer,
                                   "data": c.data}).decode()
    error = report.error[:MAX_ERROR_CHARS]  # a node's traceback can be long; 300 reports of 1 MB were 288 MiB
    progress = {"epoch": report.epoch, "step": report.step, "total_steps": report.total_steps,
                "metrics": report.metrics}
    event = {"attempt": report.attempt, "seq": report.seq, "status": report.status, **progress,
             "time": rfc3339(int(time.time() * 1000))}
    if error:
        event["error"] = error
    reply = await store.run("REPORT_PROGRESS", [
        job_id, node_id, report.attempt, report.seq, report.status,
        orjson.dumps(progress).decode() if report.status != "queued" else "",
        orjson.dumps(event).decode(), error, report.fault, token_hash, commitment,
        draw(), draw(),
    ])
    return {"ok": True, "status": reply[1], "duplicate": reply[0] == "duplicate"}


async def rendezvous(store: Store, node_id: str, job_id: str, body: Any, token_hash: str = "",
                     write: bool = True) -> dict[str, Any]:
    """A gang rank's side of the rendezvous (docs/distributed.md): ``{"attempt", "rank", "port"?, "ready"?}``.
    Rank 0 publishes the port of its c10d store (the host is its node's registered address); every rank
    says it arrived, then that it is ready. Answers the state, which ranks > 0 poll for ``master``."""
    if not isinstance(body, dict):
        raise errors.MalformedBody("the body must be a JSON object")
    attempt, rank, port, ready = body.get("attempt"), body.get("rank"), body.get("port"), body.get("ready", False)
    for name, value in (("attempt", attempt), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PROGRESS_COUNT:
            raise errors.InvalidField(f"{name} must be a whole number", field=name)
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535):
        raise errors.InvalidField("port must be a TCP port (1-65535)", field="port")
    if not isinstance(ready, bool):
        raise errors.InvalidField("ready must be true or false", field="ready")
    unknown = sorted(set(body) - {"attempt", "rank", "port", "ready"})
    if unknown:
        raise errors.InvalidField(f"unknown field {unknown[0]}", field=unknown[0])
    reply = await store.run("RENDEZVOUS", [job_id, node_id, attempt, rank, "" if port is None else port,
                                           "1" if ready else "", token_hash, "1" if write else "0"])
    return {"job_id": job_id, "attempt": attempt, "master": reply[1] or None, "world_size": int(reply[2]),
            "arrived": orjson.loads(reply[3]), "ready": orjson.loads(reply[4]), "node_ids": orjson.loads(reply[5])}


PROGRESS_PAGE = 500  # events per GET /v1/jobs/{id}/progress page unless ?limit= says otherwise
MAX_PROGRESS_PAGE = 2000
STREAM_ID_RE = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")  # with fullmatch: a stream entry id, ms-seq


def is_stream_id(text: str) -> bool:
    """A stream entry id Redis accepts (each part below 2**64): what ``next_cursor`` of /progress gives."""
    found = STREAM_ID_RE.fullmatch(text)
    return found is not None and all(int(part) < 2**64 for part in found.groups())


async def progress_events(store: Store, job_id: str, after: str = "-",
                          count: int = 10000) -> list[tuple[str, dict[str, Any]]]:
    """The job's progress events after stream id ``after`` (exclusive; '-' from the start), oldest
    first, at most ``count``. Anything but '-' or a stream id is 422 ``after``."""
    if after != "-" and not is_stream_id(after):
        raise errors.InvalidField("after must be a value of next_cursor", field="after")
    start = after if after == "-" else "(" + after
    entries = await store.redis.xrange(keys.job_progress_key(job_id), start, "+", count=count)
    return [(entry_id, orjson.loads(fields["event"])) for entry_id, fields in entries]


async def upload_attempt(store: Store, job_id: str, header: str | None) -> int:
    """The attempt an upload claims (its header), else the job's current one; 404 for no job."""
    if header is not None:
        if not is_number(header):
            raise errors.InvalidField("X-CyxWiz-Attempt must be an integer", field="X-CyxWiz-Attempt")
        return int(header)
    current = await store.redis.hget(keys.job_key(job_id), "attempt")
    if current is None:
        raise errors.NotFound(f"no job {job_id}")
    return int(current)


async def attempt_state(store: Store, node_id: str, job_id: str, attempt: str) -> dict[str, Any]:
    """For a node about to start an assignment: is this attempt of the job still live and this node's
    (not cancelled, ended or moved on while the entry waited)? 404 no job, 403 another node's attempt."""
    if not is_number(attempt):
        raise errors.InvalidField("attempt must be an integer", field="attempt")
    status, current, holder, held, members = await store.redis.hmget(
        keys.job_key(job_id), ["status", "attempt", f"node:{attempt}", "held", f"nodes:{attempt}"])
    if status is None:
        raise errors.NotFound(f"no job {job_id}")
    if holder != node_id and node_id not in orjson.loads(members or "[]"):
        raise errors.Forbidden(f"attempt {attempt} of job {job_id} is not assigned to node {node_id}")
    # a result held for its audit is over for its node: training it again would help nobody
    live = status not in TERMINAL and current == str(int(attempt)) and held != "1"
    return {"job_id": job_id, "attempt": int(attempt), "status": status, "current": live}


async def resolve_artifact(store: Store, job_id: str, name: str) -> str:
    """The stored name behind a download: ``checkpoint.safetensors`` is the latest checkpoint of the
    current attempt's chain (the one it resumes from, or saved since), kept per (attempt, step)."""
    if name != "checkpoint.safetensors":
        return name
    attempt = await store.redis.hget(keys.job_key(job_id), "attempt")
    if attempt is None:
        return name
    last, start = await store.redis.hmget(keys.job_key(job_id), [f"last_state:{attempt}", f"start:{attempt}"])
    state_id = last or start
    if not state_id:
        return name  # nothing recorded: a 404, or an artifact stored before provenance existed
    raw = await store.redis.hget(keys.job_states_key(job_id), state_id)
    artifact = orjson.loads(raw).get("artifact") if raw else None
    return artifact or name


class VerifyReport(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /v1/verifications/{task_id}: a verifier's report on the segment it replayed."""

    attempt: int
    phase: str  # digest | distance | failed | handback
    weights: str = ""
    optimizer: str = ""
    data: str = ""
    distance: float | None = None
    samples_per_s: float | None = None
    error: str = ""


VERIFY_PHASES = ("digest", "distance", "failed", "handback")
TASK_ID_RE = re.compile(r"v-[0-9a-f]{1,40}-[12]-[0-9]{1,16}-[0-9]{1,20}")  # with fullmatch


async def report_verification(store: Store, node_id: str, task_id: str, body: Any,
                              token_hash: str = "") -> dict[str, Any]:
    """Record a verifier's report; on a passed audit, what it shows of the producer's speed."""
    if not TASK_ID_RE.fullmatch(task_id):
        raise errors.NotFound(f"no verification task {task_id}")
    report = convert(body, VerifyReport)
    if report.phase not in VERIFY_PHASES:
        raise errors.InvalidField(f"phase must be one of {', '.join(VERIFY_PHASES)}", field="phase")
    if report.phase == "digest" and not (DIGEST_RE.fullmatch(report.weights) or report.weights.startswith("error:")):
        raise errors.InvalidField("weights must be a hex SHA-256, or 'error: ...' when the replay failed",
                                  field="weights")
    if report.phase == "distance" and (report.distance is None or not math.isfinite(report.distance)
                                       or report.distance < 0):
        raise errors.InvalidField("distance must be a finite number >= 0", field="distance")
    speed = report.samples_per_s if report.samples_per_s is not None and math.isfinite(report.samples_per_s) else None
    reply = await store.run("VERIFY_RESULT", [
        task_id, node_id, report.attempt, report.phase, report.weights[:300], report.optimizer[:64],
        report.data[:64], "" if report.distance is None else repr(report.distance), report.error[:MAX_ERROR_CHARS],
        token_hash, "" if speed is None else repr(max(0.0, speed)),
    ])
    if reply[0] == "compare":
        return {"ok": True, "outcome": "compare", "artifact": reply[1]}
    if reply[1] == "passed":
        await observe_speed(store, *reply[2:])
    return {"ok": True, "outcome": reply[1]}


FLOPS_FLOOR, FLOPS_TOP = 1e8, 1e14  # capability 0 and 1: a slow CPU core, an H200's dense bf16 range
FLAG_RATIO = 4.0  # a producer this many times slower than its verifier (same claimed kind) is flagged ...
FLAG_MIN_MS = 60_000  # ... on a segment long enough that process start-up does not decide it


async def observe_speed(store: Store, producer: str, job_id: str, steps: int | str, from_ms: str, to_ms: str,
                        verifier_ms: str) -> None:
    """After a passed audit: the producer's confirmed training speed in FLOP/s (its reported samples/s,
    capped by the steps the control plane saw it finish in wall-clock time), as a capability 0..1 on a
    log scale; flagged when the segment took it far longer than the verifier's replay of the same
    segment took, on hardware claimed to be the same kind (both timed by the control plane)."""
    spec_raw, progress_raw = await store.redis.hmget(keys.job_key(job_id), ["spec", "progress"])
    took_ms = int(to_ms) - int(from_ms) if from_ms and to_ms else 0
    if not spec_raw or not producer or took_ms <= 0 or int(steps) <= 0:
        return
    spec = orjson.loads(spec_raw)
    metrics = (orjson.loads(progress_raw) if progress_raw else {}).get("metrics") or {}
    speed = int(steps) * spec["training"]["batch_size"] / (took_ms / 1000)
    reported = metrics.get("samples_per_s")
    if isinstance(reported, (int, float)) and 0 < reported < speed:
        speed = float(reported)
    info = known_data_info(spec["dataset"])
    from shared.model_shapes import check_model_fits  # a submit-time check; its count is what is needed

    try:
        params = check_model_fits(spec["model"], info)
    except errors.ApiError:
        return
    per_sample = spec["model"].get("context", 1) if (info or {}).get("task") == "lm" else 1
    flops = 6.0 * params * per_sample * speed
    capability = min(1.0, max(0.0, math.log10(max(flops, 1.0) / FLOPS_FLOOR) / math.log10(FLOPS_TOP / FLOPS_FLOOR)))
    flag = ""
    replay_ms = int(verifier_ms) if verifier_ms and verifier_ms.isdigit() else 0
    if took_ms >= FLAG_MIN_MS and replay_ms > 0 and took_ms > FLAG_RATIO * replay_ms:
        flag = (f"took {took_ms / 1000:,.0f} s for a segment of job {job_id} that another node of the device kind "
                f"it claims replayed in {replay_ms / 1000:,.0f} s: its claimed hardware is doubted")
        capability /= 2
    await store.run("OBSERVE", [producer, repr(capability), flag])
