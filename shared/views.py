"""How stored hashes look to API users: the node and job objects of the contract."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import orjson


def rfc3339(ms: str | int | None) -> str | None:
    """Milliseconds since the epoch (as stored) to an RFC 3339 UTC string; None stays None."""
    if ms in (None, "", "0", 0):
        return None
    stamp = datetime.fromtimestamp(int(ms) / 1000, tz=UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _float(raw: str | None) -> float:
    return round(float(raw), 6) if raw not in (None, "") else 0.0


def node_view(h: dict[str, str]) -> dict[str, Any]:
    """A node hash as the contract's node object."""
    last = int(h.get("last_heartbeat_ms") or 0)
    status = h.get("status", "offline")
    problem = h.get("health") or None
    if last and time.time() * 1000 > last + int(h.get("ttl_ms") or 0):
        status = "offline"  # lapsed, not yet reaped
    elif status == "online" and problem:
        status = "unhealthy"  # heartbeats, but cannot read its assignments: not scheduled
    return {
        "node_id": h["node_id"],
        "name": h["name"],
        "status": status,
        "slots": int(h["slots"]),
        "running_jobs": int(h["running"]),
        "capabilities": orjson.loads(h["capabilities"]),
        "labels": orjson.loads(h["labels"]),
        "score": _float(h.get("score")),
        "reputation": _float(h.get("reputation")),
        "availability": _float(h.get("availability")),
        "capability": _float(h.get("capability")),
        "uptime": _float(h.get("uptime")),
        "last_heartbeat": rfc3339(last),
        "registered_at": rfc3339(h.get("registered_ms")),
        "health": problem,
    }


def job_view(h: dict[str, str], pending_reasons: dict[str, str] | None = None) -> dict[str, Any]:
    """A job hash as the contract's job object; ``pending_reasons`` (job id -> reason) from
    :func:`shared.jobs.pending_reasons` for queued jobs."""
    progress = orjson.loads(h["progress"]) if h.get("progress") else None
    return {
        "job_id": h["job_id"],
        "name": h["name"],
        "tenant": h["tenant"],
        "status": h["status"],
        "node_id": h.get("node_id") or None,
        "attempt": int(h["attempt"]),
        "max_attempts": int(h["max_attempts"]),
        "priority": h["priority"],
        "spec": orjson.loads(h["spec"]),
        "created_at": rfc3339(h.get("created_ms")),
        "assigned_at": rfc3339(h.get("assigned_ms")),
        "started_at": rfc3339(h.get("started_ms")),
        "finished_at": rfc3339(h.get("finished_ms")),
        "progress": progress,
        "error": h.get("error") or None,
        "artifacts": orjson.loads(h.get("artifacts") or "[]"),
        "pending_reason": (pending_reasons or {}).get(h["job_id"]) if h["status"] == "queued" else None,
        "resources": {"estimated_memory_mb": int(h.get("memory_mb") or 0)},
        "handbacks": int(h.get("handbacks") or 0),
    }
