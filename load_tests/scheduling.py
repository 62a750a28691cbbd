"""Scheduling cost vs fleet size: submit-to-assigned latency and submit throughput with 100 ... 100,000
registered nodes.

``POST /v1/jobs`` places the job inside the same Lua script that creates it (the best free node of
the job's class, from a score-ordered set), so when the 201 says ``assigned`` the job is on the
node's assignment stream: the request's latency is the submit-to-assigned latency. It is measured
one request at a time (no queueing, pure cost) and at fixed concurrency (throughput). Valkey's own
per-call time of the scripts (``INFO commandstats``) shows the server-side part alone.

Every node has enough slots that every submission of the run finds a free one; the share of jobs
actually placed is reported.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from load_tests import httpload, servers
from load_tests.fleet import DIGITS_SPEC, commandstats, register_fleet, script_latency, slots_for
from shared import keys
from shared.store import Store

JOBS_PER_SIZE = 25_000  # upper bound of submissions one fleet size sees (sets the slots per node)


async def _fleet(redis_url: str, size: int) -> dict[str, Any]:
    creds = await servers.fresh_credentials(redis_url)
    store = Store(servers.bench_settings(redis_url, CYXWIZ_TTL_S="86400"))
    try:
        started = time.perf_counter()
        await register_fleet(store, size, slots=slots_for(size, JOBS_PER_SIZE), prefix=f"fleet{size}")
        elapsed = time.perf_counter() - started
        await _settle(store)
        await store.redis.config_resetstat()
    finally:
        await store.close()
    return {"creds": creds, "register_s": round(elapsed, 2), "register_per_s": round(size / elapsed)}


async def _settle(store: Store) -> None:
    """Rewrite the append-only file now and wait for it: registering a big fleet makes Valkey fork
    for a rewrite, which would otherwise compete for the CPUs during the measurement."""
    if (await store.redis.info("persistence")).get("aof_enabled"):
        try:
            await store.redis.bgrewriteaof()
        except Exception:  # one is already running or scheduled: wait for it all the same
            pass
        while True:
            info = await store.redis.info("persistence")
            if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
                return
            await asyncio.sleep(0.1)


async def _after(redis_url: str) -> dict[str, Any]:
    store = Store(servers.bench_settings(redis_url))
    try:
        stats = await commandstats(store)
        inside = await script_latency(store)
        total = await store.redis.zcard(keys.jobs_index_key(None, None))
        queued = await store.redis.zcard(keys.QUEUE)
        memory = (await store.redis.info("memory"))["used_memory"]
        free_cpu = await store.redis.zcard(keys.nodes_free_key("cpu"))
    finally:
        await store.close()
    evalsha = stats.get("evalsha", {})
    return {"jobs": total, "queued": queued, "placed_fraction": round(1 - queued / total, 4) if total else None,
            "server_script_us_per_call": evalsha.get("usec_per_call"),
            "server_script_p50_us": inside["p50_us"], "server_script_p99_us": inside["p99_us"],
            "used_memory_mb": round(memory / 2**20),
            "free_cpu_nodes": free_cpu}


def run(redis_url: str, gateway_url: str, *, sizes: list[int], latency_s: float, throughput_s: float,
        concurrency: int, engine: str, load_cpus: str | None) -> dict[str, Any]:
    out = []
    for size in sizes:
        fleet = asyncio.run(_fleet(redis_url, size))
        submit = [httpload.raw_request("127.0.0.1", "POST", "/v1/jobs", fleet["creds"]["tenant_key"],
                                       orjson.dumps(DIGITS_SPEC))]
        one = httpload.run_load(gateway_url, submit, concurrency=1, duration_s=latency_s, engine=engine,
                                cpus=load_cpus)
        many = httpload.run_load(gateway_url, submit, concurrency=concurrency, duration_s=throughput_s,
                                 engine=engine, cpus=load_cpus)
        after = asyncio.run(_after(redis_url))
        row = {"nodes": size, "slots_per_node": slots_for(size, JOBS_PER_SIZE),
               "register_s": fleet["register_s"], "register_per_s": fleet["register_per_s"],
               "latency": {"p50_ms": round(one.p50_ms, 3), "p99_ms": round(one.p99_ms, 3), "rps": round(one.rps, 1),
                           "statuses": one.statuses},
               "throughput": {"rps": round(many.rps, 1), "p50_ms": round(many.p50_ms, 2),
                              "p99_ms": round(many.p99_ms, 2), "concurrency": concurrency,
                              "statuses": many.statuses},
               **after}
        print(f"  fleet {size:>6}: registered at {row['register_per_s']}/s; submit p50 {one.p50_ms:.2f} ms, "
              f"p99 {one.p99_ms:.2f} ms; {many.rps:.0f} submits/s at c={concurrency}; "
              f"in Valkey {row['server_script_us_per_call']} us/call (p99 <= {row['server_script_p99_us']} us); "
              f"placed {row['placed_fraction']}", flush=True)
        out.append(row)
    base, top = out[0], out[-1]
    return {"sizes": out,
            "p99_ratio_largest_to_smallest": round(top["latency"]["p99_ms"] / base["latency"]["p99_ms"], 3),
            "p50_ratio_largest_to_smallest": round(top["latency"]["p50_ms"] / base["latency"]["p50_ms"], 3),
            "throughput_ratio_largest_to_smallest": round(top["throughput"]["rps"] / base["throughput"]["rps"], 3)}
