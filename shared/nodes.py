"""Node operations: register, heartbeat, drain, read, and the capability part of the score.

The state changes themselves are Lua scripts (:mod:`shared.lua`); this module validates input,
computes what only Python knows (the capability score of a hardware description) and shapes answers.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import orjson

from shared import auth, errors, keys
from shared.store import Store
from shared.validation import convert
from shared.views import node_view


class GpuInfo(msgspec.Struct):
    name: str = "gpu"
    memory_mb: int = 0
    compute_capability: str = ""


class Capabilities(msgspec.Struct):
    """What a node reports of its hardware. Extra fields are kept, not rejected: newer runtimes may
    report more than this version scores."""

    device: str = "cpu"
    gpus: list[GpuInfo] = []
    cpu_cores: int = 1
    ram_mb: int = 0
    cuda_version: str | None = None
    torch_version: str | None = None


class Registration(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    slots: int = 1
    capabilities: Capabilities = msgspec.field(default_factory=Capabilities)
    labels: dict[str, str] = {}


class HeartbeatBody(msgspec.Struct, forbid_unknown_fields=True):
    gpu_free_mb: int | None = None


def capability_score(caps: Capabilities) -> float:
    """0..1 from hardware: a GPU node is 0.5 plus up to 0.3 for GPU memory (saturating at 80 GB in
    all) and 0.2 for compute capability (saturating at 9.0); a CPU node is up to 0.25 for cores
    (saturating at 32) plus 0.25 for RAM (saturating at 128 GB). Any GPU outranks any CPU."""
    if caps.gpus:
        memory = sum(g.memory_mb for g in caps.gpus)
        best_cc = max((_cc(g.compute_capability) for g in caps.gpus), default=0.0)
        return 0.5 + 0.3 * min(1.0, memory / 81920) + 0.2 * min(1.0, best_cc / 9.0)
    return 0.25 * min(1.0, caps.cpu_cores / 32) + 0.25 * min(1.0, caps.ram_mb / 131072)


def _cc(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        return 0.0


def _validate(reg: Registration) -> None:
    if not 1 <= len(reg.name) <= 128:
        raise errors.InvalidField("name must be 1-128 characters", field="name")
    if not 1 <= reg.slots <= 256:
        raise errors.InvalidField("slots must be between 1 and 256", field="slots")
    if reg.capabilities.cpu_cores < 0 or reg.capabilities.ram_mb < 0:
        raise errors.InvalidField("cpu_cores and ram_mb must be >= 0", field="capabilities")
    for i, gpu in enumerate(reg.capabilities.gpus):
        if gpu.memory_mb < 0:
            raise errors.InvalidField("memory_mb must be >= 0", field=f"capabilities.gpus.{i}.memory_mb")
    if len(reg.labels) > 64 or any(len(k) > 64 or len(v) > 256 for k, v in reg.labels.items()):
        raise errors.InvalidField("at most 64 labels, keys up to 64 and values up to 256 characters",
                                  field="labels")


async def register_node(store: Store, body: Any) -> dict[str, Any]:
    """Register a node (the caller checked the join token); it may be handed queued jobs at once."""
    reg = convert(body, Registration)
    _validate(reg)
    settings = store.settings
    node_id = "n-" + uuid.uuid4().hex[:16]
    token = auth.new_session_token(node_id)
    caps = reg.capabilities
    gpu = bool(caps.gpus)
    w = settings.weights
    await store.run("REGISTER_NODE", [
        node_id, reg.name, reg.slots, "gpu" if gpu else "cpu", int(gpu),
        max((g.memory_mb for g in caps.gpus), default=0), caps.ram_mb,
        orjson.dumps(body.get("capabilities", {})).decode(), orjson.dumps(reg.labels).decode(),
        auth.hash_token(token), int(settings.ttl_s * 1000), capability_score(caps),
        w.reputation, w.availability, w.capability, w.uptime,
    ])
    return {
        "node_id": node_id,
        "session_token": token,
        "heartbeat_interval_s": settings.heartbeat_interval_s,
        "ttl_s": settings.ttl_s,
        "assignments": {"stream": keys.node_stream_key(node_id), "group": keys.NODE_GROUP},
    }


async def heartbeat(store: Store, node_id: str, body: Any, token_hash: str = "") -> dict[str, Any]:
    """Keep a node alive; answer with the ids of its jobs that users cancelled since the last beat.
    With ``token_hash`` the script itself checks the session token first (401, nothing changed)."""
    beat = convert(body if body is not None else {}, HeartbeatBody)
    gpu_free_frac = ""
    if beat.gpu_free_mb is not None:
        total = await store.redis.hget(keys.node_key(node_id), "gpu_memory_mb")
        if total and int(total) > 0:
            gpu_free_frac = str(max(0.0, min(1.0, beat.gpu_free_mb / int(total))))
    reply = await store.run("HEARTBEAT", [node_id, gpu_free_frac, token_hash])
    return {"ttl_s": store.settings.ttl_s, "cancel": list(reply[3:]), "status": reply[1],
            "assigned": int(reply[2])}


async def drain_node(store: Store, node_id: str) -> dict[str, Any]:
    """Stop giving a node work; it is removed once it has no running jobs."""
    reply = await store.run("DRAIN_NODE", [node_id])
    return {"node_id": node_id, "status": reply[1]}


async def get_node(store: Store, node_id: str) -> dict[str, Any]:
    found = await store.redis.hgetall(keys.node_key(node_id))
    if not found:
        raise errors.NotFound(f"no node {node_id}")
    return node_view(found)


async def list_nodes(store: Store, limit: int, offset: int) -> tuple[list[dict[str, Any]], int | None]:
    """Nodes by score, best first, one page; the next offset or None."""
    ids = await store.redis.zrevrange(keys.NODES_SCORE, offset, offset + limit - 1)
    async with store.redis.pipeline(transaction=False) as pipe:
        for node_id in ids:
            pipe.hgetall(keys.node_key(node_id))
        hashes = await pipe.execute()
    nodes = [node_view(h) for h in hashes if h]
    return nodes, (offset + limit if len(ids) == limit else None)


async def reap(store: Store) -> list[str]:
    """Reap lapsed nodes until none is due (for ``cyxwiz reap`` and schedulers with no traffic)."""
    reaped: list[str] = []
    while True:
        batch = await store.run("REAP", [])
        reaped.extend(batch)
        if len(batch) < store.settings.reap_batch:
            return reaped
