"""Node operations: register, heartbeat, drain, read, and the capability part of the score.

The state changes themselves are Lua scripts (:mod:`shared.lua`); this module validates input,
computes what only Python knows (the capability score of a hardware description) and shapes answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import uuid
from typing import Any

import msgspec
import orjson

from shared import auth, errors, keys, store_users
from shared.jobspec import METADATA_HOSTS
from shared.store import Store, is_unavailable
from shared.validation import convert
from shared.views import node_view

log = logging.getLogger("cyxwiz.nodes")


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
    node_key: str | None = None  # the identity's secret, returned by the first registration of the name
    # where the other nodes of a multi-node job reach this one (an IP or host name); default: the address
    # the gateway saw the registration come from (docs/distributed.md)
    address: str | None = None


class HeartbeatBody(msgspec.Struct, forbid_unknown_fields=True):
    gpu_free_mb: int | None = None
    stream_error: str | None = None  # set while the node cannot read its assignment stream


MAX_STREAM_ERROR = 300  # characters of a node's stream error kept on its hash
# Registration caps: every node listing carries each node's name, labels and capabilities (a 300 KB
# capabilities blob made a 1000-node listing 85 MiB). Eight GPUs with versions take about 1 KB.
MAX_NODE_NAME = 128
MAX_CAPABILITIES_BYTES = 8 * 1024  # the JSON-encoded capabilities object, extra fields included
MAX_GPUS = 64
MAX_GPU_NAME = 128
MAX_COMPUTE_CAPABILITY = 16
MAX_VERSION = 64  # cuda_version, torch_version and device


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


def _check_text(value: str | None, max_length: int, field: str) -> None:
    """A string shown to people (listings, the CLI): printable (no control characters, no escape
    sequences), at most ``max_length`` characters."""
    if value is not None and (len(value) > max_length or not value.isprintable()):
        raise errors.InvalidField(f"{field} must be printable and at most {max_length} characters", field=field)


def _validate(reg: Registration, body: Any = None) -> None:
    """Refuse what the store should never hold; ``body`` is the decoded request (its capabilities are
    stored as sent, extra fields included, so their size is checked there)."""
    if not 1 <= len(reg.name) <= MAX_NODE_NAME or not reg.name.isprintable() or reg.name != reg.name.strip():
        raise errors.InvalidField(f"name must be 1-{MAX_NODE_NAME} printable characters, without leading or "
                                  "trailing whitespace", field="name")
    if not 1 <= reg.slots <= 256:
        raise errors.InvalidField("slots must be between 1 and 256", field="slots")
    caps = reg.capabilities
    if caps.cpu_cores < 0 or caps.ram_mb < 0:
        raise errors.InvalidField("cpu_cores and ram_mb must be >= 0", field="capabilities")
    if len(caps.gpus) > MAX_GPUS:
        raise errors.InvalidField(f"at most {MAX_GPUS} gpus", field="capabilities.gpus")
    for i, gpu in enumerate(caps.gpus):
        if gpu.memory_mb < 0:
            raise errors.InvalidField("memory_mb must be >= 0", field=f"capabilities.gpus.{i}.memory_mb")
        _check_text(gpu.name, MAX_GPU_NAME, f"capabilities.gpus.{i}.name")
        _check_text(gpu.compute_capability, MAX_COMPUTE_CAPABILITY, f"capabilities.gpus.{i}.compute_capability")
    for name in ("device", "cuda_version", "torch_version"):
        _check_text(getattr(caps, name), MAX_VERSION, f"capabilities.{name}")
    if isinstance(body, dict) and len(orjson.dumps(body.get("capabilities", {}))) > MAX_CAPABILITIES_BYTES:
        raise errors.InvalidField(f"capabilities may be at most {MAX_CAPABILITIES_BYTES} bytes of JSON",
                                  field="capabilities")
    if len(reg.labels) > 64 or any(len(k) > 64 or len(v) > 256 or not k.isprintable() or not v.isprintable()
                                   for k, v in reg.labels.items()):
        raise errors.InvalidField("at most 64 labels, printable keys up to 64 and values up to 256 characters",
                                  field="labels")
    if reg.address is not None:
        _check_address(reg.address)
    if reg.node_key is not None and not 16 <= len(reg.node_key) <= 256:
        raise errors.InvalidField("node_key must be the key a first registration returned", field="node_key")


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def _check_address(text: str) -> None:
    """A node's stated address (where its gang's other ranks connect): an IP address or a DNS host name
    (letters, digits and hyphens in dot-separated labels, the last one starting with a letter: a numeric
    one such as ``2852039166`` or ``0xa9fea9fe`` is an IPv4 address to the resolver). Never a cloud
    metadata host (the list dataset URLs are refused for, :data:`shared.jobspec.METADATA_HOSTS`), nor a
    link-local, unspecified, multicast or broadcast address: a hostile rank 0 must not point its peers
    there. Names are not resolved here (docs/distributed.md, Trust)."""
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(text)
    except ValueError:
        address = None
        labels = text.rstrip(".").split(".")
        if not (0 < len(text) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)
                and labels[-1][0].isalpha()):
            raise errors.InvalidField("address must be an IP address or a host name", field="address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if text.rstrip(".").lower() in METADATA_HOSTS or (address is not None and (
            address.is_link_local or address.is_unspecified or address.is_multicast or address == BROADCAST)):
        raise errors.InvalidField("address may not be a metadata host, nor a link-local, unspecified, multicast or "
                                  "broadcast address", field="address")


HOST_RESERVE_MB = 1024  # a CPU node's RAM kept for its OS and the runtime itself


def node_memory(caps: Capabilities, labels: dict[str, str]) -> tuple[int, int, str]:
    """(the most one job may use, what all jobs together may use, the node's placement profile).

    Jobs on a GPU node train on its GPUs (one per slot), so their memory is GPU memory: a job must fit
    the smallest GPU (the runtime puts it on the least loaded one). On a CPU node it is RAM, less what
    the host and the runtime need (a job's estimate counts its own torch). 0 means not reported: such a
    node is not checked for memory."""
    gpu_memory = [g.memory_mb for g in caps.gpus]
    if gpu_memory:
        per_job, total = min(gpu_memory), sum(gpu_memory)
    elif caps.ram_mb:
        per_job = total = max(1, caps.ram_mb - HOST_RESERVE_MB)
    else:
        per_job = total = 0
    profile = {"gpu": int(bool(gpu_memory)), "gpu_mem": max(gpu_memory, default=0), "ram": caps.ram_mb,
               "mem": per_job, "labels": labels}
    return per_job, total, orjson.dumps(profile, option=orjson.OPT_SORT_KEYS).decode()


async def register_node(store: Store, body: Any, request_host: str | None = None,
                        client_host: str | None = None) -> dict[str, Any]:
    """Register a node (the caller checked the join token); it may be handed queued jobs at once.

    Its store user is created first (so it exists before the node can learn of it) and deleted again
    if the registration is refused: a refused registration changes nothing."""
    reg = convert(body, Registration)
    _validate(reg, body)
    settings = store.settings
    node_id = "n-" + uuid.uuid4().hex[:16]
    token = auth.new_session_token(node_id)
    node_key = auth.new_token("cwi")
    stream_password = store_users.new_password()
    stream_hash = store_users.secret_hash(stream_password)
    caps = reg.capabilities
    gpu = bool(caps.gpus)
    w = settings.weights
    await store_users.create_node_user(store.redis, node_id, stream_hash)
    try:
        reply = await store.run("REGISTER_NODE", [
            node_id, reg.name, reg.slots, "gpu" if gpu else "cpu", int(gpu),
            max((g.memory_mb for g in caps.gpus), default=0), caps.ram_mb,
            orjson.dumps(body.get("capabilities", {})).decode(), orjson.dumps(reg.labels).decode(),
            auth.hash_token(token), int(settings.ttl_s * 1000), capability_score(caps),
            w.reputation, w.availability, w.capability, w.uptime,
            auth.hash_token(reg.node_key) if reg.node_key else "", auth.hash_token(node_key), stream_hash,
            *node_memory(caps, reg.labels), device_kind(caps), reg.address or client_host or "",
        ])
    except BaseException:
        with contextlib.suppress(Exception):  # the store is down, say: the user is orphaned, and harmless
            await store_users.delete_node_users(store.redis, [node_id])
        raise
    address = store_users.node_store_address(settings.redis_url, settings.node_store_url, request_host)
    answer = {
        "node_id": node_id,
        "session_token": token,
        "heartbeat_interval_s": settings.heartbeat_interval_s,
        "ttl_s": settings.ttl_s,
        "address": reg.address or client_host or None,
        "assignments": {"stream": keys.node_stream_key(node_id), "group": keys.NODE_GROUP,
                        "redis_url": store_users.with_credentials(address, store_users.node_user(node_id),
                                                                  stream_password)},
    }
    if int(reply[2]):
        answer["node_key"] = node_key
    return answer


async def heartbeat(store: Store, node_id: str, body: Any, token_hash: str = "",
                    request_host: str | None = None) -> dict[str, Any]:
    """Keep a node alive; answer with the ids of its jobs that were cancelled since the last beat
    (``cancel``: a user's cancel or the wall-clock limit; stop the job) and the attempts of multi-node jobs
    that ended elsewhere (``stop``: ``{"job_id", "attempt"}``, another rank failed or the rendezvous timed
    out; stop that attempt only). With ``token_hash`` the script itself checks the session token first
    (401, nothing changed).

    A node that cannot read its assignment stream says so (``stream_error``): it is not scheduled
    while it lasts, its store user is recreated (a restarted store may have lost it), and the answer
    tells it the store's current address (``store_url``, no credentials) to reconnect to."""
    beat = convert(body if body is not None else {}, HeartbeatBody)
    gpu_free_frac = ""
    if beat.gpu_free_mb is not None:
        total = await store.redis.hget(keys.node_key(node_id), "gpu_memory_mb")
        if total and int(total) > 0:
            gpu_free_frac = str(max(0.0, min(1.0, beat.gpu_free_mb / int(total))))
    health = (beat.stream_error or "")[:MAX_STREAM_ERROR]
    reply = await store.run("HEARTBEAT", [node_id, gpu_free_frac, token_hash, health])
    cancel: list[str] = []
    stop: list[dict[str, Any]] = []
    for entry in reply[4:]:  # the node's cancel set: job ids, and job_id:attempt for a gang's attempt
        job_id, _, attempt = entry.partition(":")
        if attempt:
            stop.append({"job_id": job_id, "attempt": int(attempt)})
        else:
            cancel.append(job_id)
    answer: dict[str, Any] = {"ttl_s": store.settings.ttl_s, "cancel": cancel, "stop": stop, "status": reply[1],
                              "assigned": int(reply[2])}
    if health:
        if reply[3]:
            await store_users.create_node_user(store.redis, node_id, reply[3])
        answer["store_url"] = store_users.node_store_address(store.settings.redis_url,
                                                             store.settings.node_store_url, request_host)
    return answer


async def drain_node(store: Store, node_id: str) -> dict[str, Any]:
    """Stop giving a node work; it is removed once it has no running jobs."""
    reply = await store.run("DRAIN_NODE", [node_id])
    return {"node_id": node_id, "status": reply[1]}


def device_kind(caps: Capabilities) -> str:
    """Who may replay whose training in an audit: ``cpu``, or the name of the node's (first) GPU."""
    return caps.gpus[0].name[:MAX_GPU_NAME] if caps.gpus else "cpu"


async def _trust(store: Store, hashes: list[dict[str, str]]) -> list[dict[str, str]]:
    """Each node hash with its identity's audit record (probation, audits passed and failed, flags)."""
    names = [h.get("name", "") for h in hashes]
    async with store.redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hmget(keys.NODES_AUDITS, [f"{name}:passed", f"{name}:failed"])
            pipe.hget(keys.NODES_FLAGS, name)
            pipe.hget(keys.NODES_OBSERVED, name)
        answers = await pipe.execute()
    probation = store.settings.probation_audits
    for index, h in enumerate(hashes):
        (passed, failed), flag, observed = answers[3 * index:3 * index + 3]
        h["audits_passed"], h["audits_failed"] = passed or "0", failed or "0"
        h["probation"] = "1" if int(h["audits_passed"]) < probation else "0"
        h["flag"], h["observed_capability"] = flag or "", observed or ""
    return hashes


async def get_node(store: Store, node_id: str) -> dict[str, Any]:
    found = await store.redis.hgetall(keys.node_key(node_id))
    if not found:
        raise errors.NotFound(f"no node {node_id}")
    return node_view((await _trust(store, [found]))[0])


async def list_nodes(store: Store, limit: int, offset: int) -> tuple[list[dict[str, Any]], int | None]:
    """Nodes by score, best first, one page; the next offset or None."""
    ids = await store.redis.zrevrange(keys.NODES_SCORE, offset, offset + limit - 1)
    async with store.redis.pipeline(transaction=False) as pipe:
        for node_id in ids:
            pipe.hgetall(keys.node_key(node_id))
        hashes = await pipe.execute()
    nodes = [node_view(h) for h in await _trust(store, [h for h in hashes if h])]
    return nodes, (offset + limit if len(ids) == limit else None)


async def reap(store: Store) -> list[str]:
    """Reap lapsed nodes until none is due, then delete the store users of removed nodes. Every
    gateway process runs this on a timer (:func:`reap_forever`); ``cyxwiz reap`` runs it by hand."""
    reaped: list[str] = []
    while True:
        batch = await store.run("REAP", [])
        reaped.extend(batch)
        if len(batch) < store.settings.reap_batch:
            break
    while await store_users.delete_pending_node_users(store.redis):
        pass
    return reaped


async def reap_forever(store: Store) -> None:
    """Reap every ``reap_interval_s``: dead nodes are found with no other traffic, and each run is the
    control plane's pulse (see ``plane_pulse`` in :mod:`shared.lua_prelude`). Store outages are
    waited out quietly; the first of a run of errors is logged."""
    failing = False
    while True:
        await asyncio.sleep(store.settings.reap_interval_s)
        try:
            await reap(store)
        except Exception as exc:  # noqa: BLE001 - the timer must outlive any one failure
            if not failing:
                if is_unavailable(exc):
                    log.warning("reaper: the state store is unreachable (%s); retrying", exc)
                else:
                    log.exception("reaper: unexpected error")
            failing = True
        else:
            failing = False
