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
        "address": h.get("address") or None,
        "score": _float(h.get("score")),
        "reputation": _float(h.get("reputation")),
        "availability": _float(h.get("availability")),
        "capability": _float(h.get("capability_used") or h.get("capability")),
        "claimed_capability": _float(h.get("capability")),
        "uptime": _float(h.get("uptime")),
        "last_heartbeat": rfc3339(last),
        "registered_at": rfc3339(h.get("registered_ms")),
        "health": problem,
        "device_kind": h.get("device_kind") or None,
        "probation": h.get("probation") == "1",
        "audits_passed": int(h.get("audits_passed") or 0),
        "audits_failed": int(h.get("audits_failed") or 0),
        "observed_capability": _float(h.get("observed_capability")) if h.get("observed_capability") else None,
        "flag": h.get("flag") or None,
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
        "node_ids": node_ids(h),
        "ranks": ranks_view(h, progress),
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
        "verification": verification_view(h),
        "attempts": attempts_view(h),
    }


def node_ids(h: dict[str, str]) -> list[str]:
    """The nodes holding the current attempt in rank order (``node_id`` is rank 0's); [] while queued."""
    members = h.get(f"nodes:{h['attempt']}")
    if members and h.get("node_id"):
        return list(orjson.loads(members))
    return [h["node_id"]] if h.get("node_id") else []


def ranks_view(h: dict[str, str], progress: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """Per rank of a multi-node job: its node and training throughput (from rank 0's reports, metrics
    ``samples_per_s/rank{r}``); None for a one-node job."""
    if int(h.get("gang") or 1) <= 1:
        return None
    metrics = (progress or {}).get("metrics") or {}
    return [{"rank": rank, "node_id": node_id, "samples_per_s": metrics.get(f"samples_per_s/rank{rank}")}
            for rank, node_id in enumerate(node_ids(h))]


def verification_view(h: dict[str, str]) -> dict[str, Any] | None:
    """The audit of the job's result (docs/verification.md), or None before it has one."""
    status = h.get("verify_status")
    if not status:
        return None
    distance = h.get("verify_distance")
    return {
        "status": status,
        "segment": orjson.loads(h["verify_segment"]) if h.get("verify_segment") else None,
        "steps": orjson.loads(h["verify_steps"]) if h.get("verify_steps") else None,
        "verifier": h.get("verify_verifier") or None,
        "distance": float(distance) if distance else None,
        "round": int(h.get("verify_round") or 0) or None,
        "note": h.get("verify_note") or None,
    }


def attempts_view(h: dict[str, str]) -> list[dict[str, Any]]:
    """Which node ran each attempt, oldest first (attempts never placed are left out)."""
    found = []
    for number in range(1, int(h["attempt"]) + 1):
        node_id = h.get(f"node:{number}")
        if node_id:
            entry = {"attempt": number, "node_id": node_id, "node": h.get(f"node_name:{number}") or None,
                     "started_from": h.get(f"start:{number}") or None}
            if h.get(f"nodes:{number}"):
                entry["node_ids"] = orjson.loads(h[f"nodes:{number}"])
            if h.get(f"ended:{number}"):
                entry["ended"] = h[f"ended:{number}"]  # why it went back to the queue
            found.append(entry)
    return found
