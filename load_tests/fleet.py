"""Fleets for the benchmarks: many nodes registered through the real state code, pipelined.

Nodes are registered with the REGISTER_NODE Lua script, with the same prelude and the same arguments
that :func:`shared.nodes.register_node` builds, each with its own store ACL user as registration
creates it, thousands per pipeline round trip, so a 100,000-node fleet takes seconds. Their TTL is
long (a day) so none lapses while a benchmark runs.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import msgspec
import orjson

from shared import auth, lua, nodes, store_users
from shared.jobspec import DIGITS_MLP_EXAMPLE
from shared.lua_prelude import build_prelude
from shared.store import Store

CPU_CAPS: dict[str, Any] = {"device": "cpu", "cpu_cores": 16, "ram_mb": 65536, "torch_version": "2.5.1"}
GPU_CAPS: dict[str, Any] = {"device": "cuda", "cpu_cores": 32, "ram_mb": 262144, "cuda_version": "12.4",
                            "torch_version": "2.5.1",
                            "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_mb": 81559,
                                      "compute_capability": "9.0"}]}
GPU_EVERY = 5  # one node in five has a GPU

DIGITS_SPEC = DIGITS_MLP_EXAMPLE


def slots_for(fleet: int, jobs: int) -> int:
    """Slots per node so that ``jobs`` submissions all find a free slot (1..256, the API's range)."""
    return max(1, min(256, math.ceil(jobs / fleet)))


async def register_fleet(store: Store, count: int, *, slots: int = 1, prefix: str = "bench",
                         batch: int = 2000) -> dict[str, str]:
    """Register ``count`` nodes; returns node_id -> session token."""
    script = store.redis.register_script(build_prelude(store.settings) + lua.REGISTER_NODE)
    w = store.settings.weights
    ttl_ms = int(store.settings.ttl_s * 1000)
    kinds = {}
    for kind, caps in (("cpu", CPU_CAPS), ("gpu", GPU_CAPS)):
        parsed = msgspec.convert(caps, nodes.Capabilities)
        kinds[kind] = (orjson.dumps(caps).decode(), nodes.capability_score(parsed),
                       max((g.memory_mb for g in parsed.gpus), default=0), parsed.ram_mb,
                       nodes.node_memory(parsed, {}))
    tokens: dict[str, str] = {}
    for start in range(0, count, batch):
        async with store.redis.pipeline(transaction=False) as pipe:
            for i in range(start, min(count, start + batch)):
                kind = "gpu" if i % GPU_EVERY == 0 else "cpu"
                caps_json, capability, gpu_mem, ram, memory = kinds[kind]
                node_id = "n-" + uuid.uuid4().hex[:16]
                token = auth.new_session_token(node_id)
                tokens[node_id] = token
                stream_hash = store_users.secret_hash(store_users.new_password())
                pipe.execute_command("ACL", "SETUSER", store_users.node_user(node_id),
                                     *store_users.node_rules(node_id, stream_hash))
                await script(keys=[], args=[
                    node_id, f"{prefix}-{i}", slots, kind, int(kind == "gpu"), gpu_mem, ram, caps_json, "{}",
                    auth.hash_token(token), ttl_ms, capability, w.reputation, w.availability, w.capability,
                    w.uptime, "", auth.hash_token(auth.new_token("cwi")), stream_hash, *memory], client=pipe)
            await pipe.execute()
    return tokens


async def commandstats(store: Store) -> dict[str, dict[str, float]]:
    """Valkey's per-command call counts and microseconds (since the last CONFIG RESETSTAT)."""
    info = await store.redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): {"calls": v["calls"], "usec_per_call": v["usec_per_call"]}
            for name, v in info.items() if isinstance(v, dict)}


async def script_latency(store: Store) -> dict[str, float | None]:
    """p50 and p99 of the scripts' run time inside Valkey (``LATENCY HISTOGRAM evalsha``, buckets
    doubling in size, so each value is the upper bound of its bucket)."""
    found = await store.redis.execute_command("LATENCY", "HISTOGRAM", "evalsha")
    entry = found.get("evalsha") if isinstance(found, dict) else None
    if not entry:
        return {"p50_us": None, "p99_us": None}
    calls, buckets = entry["calls"], sorted(entry["histogram_usec"].items())

    def upper(p: float) -> float | None:
        return next((float(bound) for bound, cumulative in buckets if cumulative >= p * calls), None)

    return {"p50_us": upper(0.5), "p99_us": upper(0.99)}
