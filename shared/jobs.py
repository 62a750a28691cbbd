"""Job operations: submit (with immediate placement), read, list, cancel, progress reports.

Validation happens here, before any state is touched; every change is one Lua script
(:mod:`shared.lua`), so a rejected request changes nothing and concurrent requests cannot interleave.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec
import orjson

from shared import errors, keys
from shared.auth import Principal
from shared.jobspec import parse_job_spec
from shared.store import Store
from shared.transitions import JOB_STATUSES, PRIORITY_BANDS, TERMINAL
from shared.validation import convert, is_number
from shared.views import job_view, rfc3339

MAX_IDEMPOTENCY_KEY = 255


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


REPORT_STATUSES = ("running", "completed", "failed", "queued")


async def submit_job(store: Store, who: Principal, body: Any,
                     idempotency_key: str | None) -> tuple[int, dict[str, Any]]:
    """Create a job and place it on the best node that fits, or queue it. 201, or 200 for a repeat
    of an Idempotency-Key."""
    spec = parse_job_spec(body)
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
        raise errors.InvalidField(f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} characters",
                                  field="Idempotency-Key")
    req = spec["requirements"]
    job_id = "j-" + uuid.uuid4().hex[:20]
    reply = await store.run("SUBMIT_JOB", [
        job_id, who.tenant, idempotency_key or "", spec["name"], spec["priority"],
        PRIORITY_BANDS[spec["priority"]], spec["max_attempts"], orjson.dumps(spec).decode(),
        int(bool(req["gpu"])), req["min_gpu_memory_mb"], req["min_ram_mb"],
        orjson.dumps(req["labels"], option=orjson.OPT_SORT_KEYS).decode(),
    ])
    kind, job_id, status, node_id = reply
    answer = {"job_id": job_id, "status": status, "node_id": node_id or None}
    return (200 if kind == "existing" else 201), answer


async def _job_hash(store: Store, who: Principal, job_id: str) -> dict[str, str]:
    found = await store.redis.hgetall(keys.job_key(job_id))
    if not found or (not who.admin and found["tenant"] != who.tenant):
        raise errors.NotFound(f"no job {job_id}")  # another tenant's job looks like no job at all
    return found  # type: ignore[no-any-return]


async def get_job(store: Store, who: Principal, job_id: str) -> dict[str, Any]:
    return job_view(await _job_hash(store, who, job_id))


async def check_job_visible(store: Store, who: Principal, job_id: str) -> None:
    """404 unless this principal may see the job."""
    tenant = await store.redis.hget(keys.job_key(job_id), "tenant")
    if tenant is None or (not who.admin and tenant != who.tenant):
        raise errors.NotFound(f"no job {job_id}")


def _list_args(status: str | None, limit: str | None, cursor: str | None) -> tuple[str | None, int, str]:
    if status is not None and status not in JOB_STATUSES:
        raise errors.InvalidField(f"status must be one of {', '.join(JOB_STATUSES)}", field="status")
    try:
        count = 50 if limit is None else int(limit)
    except ValueError:
        raise errors.InvalidField("limit must be an integer", field="limit") from None
    if not 1 <= count <= 500:
        raise errors.InvalidField("limit must be between 1 and 500", field="limit")
    if cursor is not None and not is_number(cursor):
        raise errors.InvalidField("cursor must be a value of next_cursor", field="cursor")
    return status, count, f"({cursor}" if cursor else "+inf"


async def list_jobs(store: Store, who: Principal, status: str | None, limit: str | None,
                    cursor: str | None) -> dict[str, Any]:
    """Newest first, one page; ``next_cursor`` continues after the last job shown."""
    status, count, top = _list_args(status, limit, cursor)
    index = keys.jobs_index_key(None if who.admin else who.tenant, status)
    page = await store.redis.zrevrangebyscore(index, top, "-inf", start=0, num=count, withscores=True)
    async with store.redis.pipeline(transaction=False) as pipe:
        for job_id, _ in page:
            pipe.hgetall(keys.job_key(job_id))
        hashes = await pipe.execute()
    jobs = [job_view(h) for h in hashes if h]
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
    if report.fault not in ("job", "node"):
        raise errors.InvalidField("fault must be 'job' or 'node'", field="fault")
    if report.attempt < 1 or report.seq < 0:
        raise errors.InvalidField("attempt must be >= 1 and seq >= 0", field="attempt" if report.attempt < 1 else "seq")
    if report.status == "failed" and not report.error:
        raise errors.InvalidField("a failed report needs an error", field="error")
    progress = {"epoch": report.epoch, "step": report.step, "total_steps": report.total_steps,
                "metrics": report.metrics}
    event = {"attempt": report.attempt, "seq": report.seq, "status": report.status, **progress,
             "time": rfc3339(int(time.time() * 1000))}
    if report.error:
        event["error"] = report.error
    reply = await store.run("REPORT_PROGRESS", [
        job_id, node_id, report.attempt, report.seq, report.status,
        orjson.dumps(progress).decode() if report.status != "queued" else "",
        orjson.dumps(event).decode(), report.error[:4000], report.fault, token_hash,
    ])
    return {"ok": True, "status": reply[1], "duplicate": reply[0] == "duplicate"}


async def progress_events(store: Store, job_id: str, after: str = "-",
                          count: int = 10000) -> list[tuple[str, dict[str, Any]]]:
    """The job's progress events after stream id ``after`` (exclusive unless '-'), oldest first."""
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
    status, current, holder = await store.redis.hmget(keys.job_key(job_id), ["status", "attempt", f"node:{attempt}"])
    if status is None:
        raise errors.NotFound(f"no job {job_id}")
    if holder != node_id:
        raise errors.Forbidden(f"attempt {attempt} of job {job_id} is not assigned to node {node_id}")
    live = status not in TERMINAL and current == str(int(attempt))
    return {"job_id": job_id, "attempt": int(attempt), "status": status, "current": live}
