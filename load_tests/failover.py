"""Failure detection and reassignment: a node holding a job stops heartbeating; how long until the job
is running elsewhere?

Each trial uses exactly two nodes registered over HTTP with the gateway's own liveness settings.
Node A registers first and receives the job; node B registers next. Both heartbeat on the interval
from their registration answer, as runtimes do. At a random moment A stops (a killed process sends
nothing more). The clock stops when B's XREADGROUP on its assignment stream returns the job.

Any function call reaps nodes whose deadline passed, and so does every gateway's reaper timer
(``CYXWIZ_REAP_INTERVAL_S``, at most 1 s), so the job moves at most a tick after A's TTL ran out:
latency = TTL - (time since A's last beat when it died) + (up to one reaper tick) + delivery, i.e.
between TTL - interval and TTL + tick. The model below keeps the older bound, TTL +/- interval.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

import redis.asyncio as aioredis

from load_tests.fleet import DIGITS_SPEC
from load_tests.httpload import request_json

CAPS = {"device": "cpu", "cpu_cores": 8, "ram_mb": 32768}


async def _register(api_url: str, join_token: str, name: str) -> dict[str, Any]:
    status, reg = await request_json(api_url, "POST", "/v1/nodes", join_token,
                                     {"name": name, "slots": 1, "capabilities": CAPS})
    if status != 201:
        raise RuntimeError(f"register {name}: {status} {reg}")
    return reg  # type: ignore[no-any-return]


async def _heartbeat_forever(api_url: str, reg: dict[str, Any]) -> None:
    while True:
        await asyncio.sleep(reg["heartbeat_interval_s"])
        await request_json(api_url, "POST", f"/v1/nodes/{reg['node_id']}/heartbeat", reg["session_token"], {})


async def _first_assignment(redis: aioredis.Redis, reg: dict[str, Any]) -> tuple[float, str, int]:
    """(local time it arrived, job id, server time of the assignment in ms) of the node's first entry."""
    stream, group = reg["assignments"]["stream"], reg["assignments"]["group"]
    while True:
        answer = await redis.xreadgroup(group, reg["node_id"], {stream: ">"}, count=1, block=100)
        for _, entries in answer or []:
            for entry_id, fields in entries:
                return time.time(), fields["job_id"], int(entry_id.split("-")[0])


async def one_trial(api_url: str, redis_url: str, creds: dict[str, str], trial: int) -> dict[str, Any]:
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    tasks: list[asyncio.Task[None]] = []
    try:
        a = await _register(api_url, creds["join_token"], f"failover-a-{trial}")
        status, job = await request_json(api_url, "POST", "/v1/jobs", creds["api_key"], DIGITS_SPEC)
        if status != 201 or job["node_id"] != a["node_id"]:
            raise RuntimeError(f"the job did not go to node A: {status} {job}")
        b = await _register(api_url, creds["join_token"], f"failover-b-{trial}")
        interval, ttl = a["heartbeat_interval_s"], a["ttl_s"]
        a_beats = asyncio.create_task(_heartbeat_forever(api_url, a))
        tasks += [a_beats, asyncio.create_task(_heartbeat_forever(api_url, b))]
        await asyncio.sleep(random.uniform(interval, 2 * interval))  # die at a random point of A's cycle
        a_beats.cancel()
        killed = time.time()
        arrived, job_id, assigned_ms = await asyncio.wait_for(_first_assignment(redis, b), ttl + 4 * interval + 10)
        if job_id != job["job_id"]:
            raise RuntimeError(f"node B got {job_id}, not {job['job_id']}")
        status, seen = await request_json(api_url, "GET", f"/v1/jobs/{job_id}", creds["api_key"])
        return {"trial": trial, "latency_s": round(arrived - killed, 3),
                "detected_and_reassigned_s": round(assigned_ms / 1000 - killed, 3),
                "job_status": seen["status"], "attempt": seen["attempt"], "node_is_b": seen["node_id"] == b["node_id"]}
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await redis.aclose()


async def run_trials(api_url: str, redis_url: str, creds_factory: Any, trials: int) -> list[dict[str, Any]]:
    """``creds_factory()`` empties the store and returns fresh credentials for each trial."""
    results = []
    for trial in range(trials):
        creds = await creds_factory()
        results.append(await one_trial(api_url, redis_url, creds, trial))
    return results


def summarize(results: list[dict[str, Any]], interval_s: float, ttl_s: float) -> dict[str, Any]:
    latencies = [r["latency_s"] for r in results]
    return {
        "heartbeat_interval_s": interval_s, "ttl_s": ttl_s, "trials": results,
        "latency_s": {"min": min(latencies), "median": statistics.median(latencies), "max": max(latencies)},
        "model_s": model(interval_s, ttl_s),
    }


def model(interval_s: float, ttl_s: float) -> dict[str, float]:
    """Expected node-killed -> job-reassigned time with two nodes (see the module docstring)."""
    return {"min": ttl_s - interval_s, "mean": ttl_s, "max": ttl_s + interval_s}
