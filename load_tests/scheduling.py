"""Scheduling cost vs fleet size: submit-to-assigned latency and submit throughput with 100 ... 100,000
registered nodes.

``POST /v1/jobs`` places the job inside the same Lua script that creates it (the best free node of
the job's class, from a score-ordered set), so when the 201 says ``assigned`` the job is on the
node's assignment stream: the request's latency is the submit-to-assigned latency. It is measured
one request at a time (no queueing, pure cost) and at fixed concurrency (throughput).

All fleets exist at once, each in its own Valkey database with its own gateway (same Hypercorn
set-up, same CPU), and the sizes are measured in interleaved rounds, so anything else running on the
machine hits every size alike. Valkey's own time for the scripts (``INFO commandstats`` and
``LATENCY HISTOGRAM``) shows the server-side part alone. Every node has enough slots that every
submission finds a free one; the share of jobs actually placed is reported.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from contextlib import ExitStack
from typing import Any

import httpx
import orjson

from load_tests import httpload, servers
from load_tests.fleet import DIGITS_SPEC, commandstats, register_fleet, script_latency, slots_for
from shared import keys
from shared.store import Store

JOBS_PER_SIZE = 25_000  # upper bound of submissions one fleet size sees (sets the slots per node)


def _db_url(redis_url: str, db: int) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{db}"


async def _fleet(redis_url: str, size: int) -> dict[str, Any]:
    creds = await servers.fresh_credentials(redis_url)
    store = Store(servers.bench_settings(redis_url, CYXWIZ_TTL_S="86400"))
    try:
        memory_before = (await store.redis.info("memory"))["used_memory"]
        users_before = len(await store.redis.acl_users())
        started = time.perf_counter()
        await register_fleet(store, size, slots=slots_for(size, JOBS_PER_SIZE), prefix=f"fleet{size}")
        elapsed = time.perf_counter() - started
        memory = (await store.redis.info("memory"))["used_memory"] - memory_before
        users = len(await store.redis.acl_users()) - users_before
    finally:
        await store.close()
    return {"creds": creds, "register_s": round(elapsed, 2), "register_per_s": round(size / elapsed),
            "store_memory_mb": round(memory / 2**20, 1), "store_bytes_per_node": round(memory / size),
            "acl_users": users}


async def _http_registrations(url: str, join_token: str, count: int, concurrency: int = 16) -> dict[str, Any]:
    """Register ``count`` new nodes through the API (each: its store user, then REGISTER_NODE), as
    real nodes join a fleet that is already this big; registrations per second and p99."""
    latencies: list[float] = []
    names = iter(range(count))
    async with httpx.AsyncClient(base_url=url, timeout=30,
                                 headers={"Authorization": f"Bearer {join_token}"}) as client:
        async def worker() -> None:
            for i in names:
                body = {"name": f"joining-{uuid.uuid4().hex[:12]}-{i}", "slots": 1,
                        "capabilities": {"device": "cpu", "cpu_cores": 8, "ram_mb": 32768}}
                started = time.perf_counter()
                resp = await client.post("/v1/nodes", json=body)
                latencies.append(time.perf_counter() - started)
                resp.raise_for_status()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {"count": count, "per_s": round(count / elapsed, 1),
            "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1000, 2)}


async def _settle(redis_url: str) -> None:
    """Rewrite the append-only file now and wait for it: registering big fleets makes Valkey fork for
    a rewrite, which would otherwise compete for the CPUs during the measurement. Then reset stats."""
    store = Store(servers.bench_settings(redis_url))
    try:
        if (await store.redis.info("persistence")).get("aof_enabled"):
            try:
                await store.redis.bgrewriteaof()
            except Exception:  # one is already running or scheduled: wait for it all the same
                pass
            while True:
                info = await store.redis.info("persistence")
                if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
                    break
                await asyncio.sleep(0.1)
        await store.redis.config_resetstat()
    finally:
        await store.close()


async def _after(redis_url: str) -> dict[str, Any]:
    store = Store(servers.bench_settings(redis_url))
    try:
        total = await store.redis.zcard(keys.jobs_index_key(None, None))
        queued = await store.redis.zcard(keys.queue_key("cpu"))
    finally:
        await store.close()
    return {"jobs": total, "queued": queued, "placed_fraction": round(1 - queued / total, 4) if total else None}


async def _server_side(redis_url: str) -> dict[str, Any]:
    """Script time inside Valkey over the whole measurement (all sizes: commandstats are per server)."""
    store = Store(servers.bench_settings(redis_url))
    try:
        evalsha = (await commandstats(store)).get("evalsha", {})
        inside = await script_latency(store)
        memory = (await store.redis.info("memory"))["used_memory"]
    finally:
        await store.close()
    return {"script_us_per_call": evalsha.get("usec_per_call"), "script_p50_us": inside["p50_us"],
            "script_p99_us": inside["p99_us"], "used_memory_mb": round(memory / 2**20)}


def run(redis_url: str, *, sizes: list[int], rounds: int, latency_s: float, throughput_s: float, concurrency: int,
        engine: str, load_cpus: str | None, server_cpus: str | None) -> dict[str, Any]:
    urls = {size: _db_url(redis_url, db) for db, size in enumerate(sizes, start=1)}
    fleets = {size: asyncio.run(_fleet(urls[size], size)) for size in sizes}
    asyncio.run(_settle(redis_url))
    samples: dict[int, dict[str, list[Any]]] = {size: {"one": [], "many": []} for size in sizes}
    with ExitStack() as stack:
        gateways = {size: stack.enter_context(servers.hypercorn("functions.gateway:app", cpus=server_cpus,
                                                                 env={"CYXWIZ_REDIS_URL": urls[size]}))[0]
                    for size in sizes}
        submit = {size: [httpload.raw_request("127.0.0.1", "POST", "/v1/jobs", fleets[size]["creds"]["tenant_key"],
                                              orjson.dumps(DIGITS_SPEC))] for size in sizes}
        for size in sizes:  # warm-up
            httpload.run_load(gateways[size], submit[size], concurrency=4, duration_s=1, engine=engine, cpus=load_cpus)
        joins = {size: asyncio.run(_http_registrations(gateways[size], fleets[size]["creds"]["join_token"],
                                                       100 * rounds)) for size in sizes}
        for _ in range(rounds):
            for size in sizes:
                samples[size]["one"].append(httpload.run_load(gateways[size], submit[size], concurrency=1,
                                                              duration_s=latency_s, engine=engine, cpus=load_cpus))
            for size in sizes:
                samples[size]["many"].append(httpload.run_load(gateways[size], submit[size], concurrency=concurrency,
                                                               duration_s=throughput_s, engine=engine,
                                                               cpus=load_cpus))
    out = []
    for size in sizes:
        one, many = samples[size]["one"], samples[size]["many"]
        row = {"nodes": size, "slots_per_node": slots_for(size, JOBS_PER_SIZE),
               "register_s": fleets[size]["register_s"], "register_per_s": fleets[size]["register_per_s"],
               "store_memory_mb": fleets[size]["store_memory_mb"],
               "store_bytes_per_node": fleets[size]["store_bytes_per_node"], "acl_users": fleets[size]["acl_users"],
               "http_registration": joins[size],
               "latency": {"p50_ms": round(statistics.median(r.p50_ms for r in one), 3),
                           "p99_ms": round(statistics.median(r.p99_ms for r in one), 3),
                           "p99_ms_by_round": [round(r.p99_ms, 3) for r in one],
                           "requests": sum(r.requests for r in one)},
               "throughput": {"rps": round(statistics.median(r.rps for r in many), 1),
                              "p50_ms": round(statistics.median(r.p50_ms for r in many), 2),
                              "p99_ms": round(statistics.median(r.p99_ms for r in many), 2),
                              "concurrency": concurrency},
               "non_2xx": sum(v for r in one + many for k, v in r.statuses.items() if not k.startswith("2")),
               **asyncio.run(_after(urls[size]))}
        lat = row["latency"]
        print(f"  fleet {size:>6}: registered at {row['register_per_s']}/s ({row['acl_users']} store users, "
              f"{row['store_memory_mb']} MiB); joins over HTTP {joins[size]['per_s']}/s "
              f"(p99 {joins[size]['p99_ms']} ms); submit p50 {lat['p50_ms']:.2f} ms, "
              f"p99 {lat['p99_ms']:.2f} ms; {row['throughput']['rps']:.0f} submits/s at c={concurrency}; "
              f"placed {row['placed_fraction']}", flush=True)
        out.append(row)
    base, top = out[0], out[-1]
    return {"sizes": out, "rounds": rounds, "server_side_all_sizes": asyncio.run(_server_side(redis_url)),
            "p99_ratio_largest_to_smallest": round(top["latency"]["p99_ms"] / base["latency"]["p99_ms"], 3),
            "p50_ratio_largest_to_smallest": round(top["latency"]["p50_ms"] / base["latency"]["p50_ms"], 3),
            "throughput_ratio_largest_to_smallest": round(top["throughput"]["rps"] / base["throughput"]["rps"], 3),
            "http_registration_ratio_largest_to_smallest": round(
                top["http_registration"]["per_s"] / base["http_registration"]["per_s"], 3)}
