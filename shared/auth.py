"""Tokens: join tokens, node session tokens and tenants' API keys.

Only SHA-256 digests of tokens are stored. API keys and join tokens are looked up by their digest
(so no stored secret is ever compared byte by byte); a node's session token is compared with its
stored digest by :func:`hmac.compare_digest`, in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
from redis.exceptions import ExecAbortError, OutOfMemoryError

from shared import errors, keys
from shared.store import Store
from shared.views import rfc3339

TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # used with fullmatch: "$" would accept a final newline
# The node id a session token names: the same form as NodeIdConvertor's in shared/http.py, so a token can
# never name another key ("n-...:assignments" is a stream) and turn a refusal into a 500.
NODE_ID_RE = re.compile(r"n-[0-9a-f]{16}")
ADMIN_TENANT = "admin"
KEY_ID_RE = re.compile(r"k-[0-9a-f]{16}")  # with fullmatch: what key_id_of makes


def hash_token(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def key_id_of(key_hash: str) -> str:
    """An API key's id, from its digest: ``k-`` and the digest's first 16 hex digits. Lists show it and
    revocation takes it, so a key is never shown again after it is created. Derived, not drawn, so a key
    stored before keys had ids has the same id as if it had been given one."""
    return "k-" + key_hash[:16]


def new_token(kind: str) -> str:
    """A fresh random token; the prefix (``cwk`` API key, ``cwj`` join, ``cwn`` node) tells kinds apart."""
    return f"{kind}_{secrets.token_urlsafe(32)}"


@dataclass(frozen=True)
class Principal:
    """Who an API key belongs to. ``admin`` sees every tenant; ``key_id`` is the key that was used."""

    tenant: str
    admin: bool
    key_id: str = ""

    def scope(self) -> str:
        """The tenant filter for Lua scripts: '' means every tenant."""
        return "" if self.admin else self.tenant


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, or 401."""
    if not authorization:
        raise errors.Unauthorized("missing Authorization: Bearer <token> header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.Unauthorized("the Authorization header must be 'Bearer <token>'")
    return token.strip()


async def authenticate_api_key(store: Store, authorization: str | None) -> Principal:
    """The principal of an API key, or 401."""
    token = bearer_token(authorization)
    raw = await store.redis.hget(keys.API_KEYS, hash_token(token))
    if raw is None:
        raise errors.Unauthorized("unknown API key")
    entry = orjson.loads(raw)
    limit = store.settings.rate_limit_per_s
    if limit:
        await _check_rate(store, hash_token(token), limit)
    return Principal(tenant=entry["tenant"], admin=bool(entry.get("admin")), key_id=key_id_of(hash_token(token)))


async def _check_rate(store: Store, key_hash: str, limit: int) -> None:
    """A fixed one-second window per API key; over the limit: 429 with Retry-After."""
    second = int(time.time())
    try:
        async with store.redis.pipeline(transaction=True) as pipe:
            pipe.incr(keys.rate_key(key_hash, second))
            pipe.expire(keys.rate_key(key_hash, second), 2)
            count, _ = await pipe.execute()
    except (OutOfMemoryError, ExecAbortError):  # ExecAbortError: the MULTI was refused for the same reason
        return  # a full store (maxmemory): reads must still work, and writes get their 507 where they write
    if count > limit:
        raise errors.RateLimited(f"more than {limit} requests per second with this API key",
                                 headers={"Retry-After": "1"})


async def authenticate_join(store: Store, authorization: str | None) -> None:
    """Pass for a valid join token, else 401."""
    token = bearer_token(authorization)
    if not await store.redis.hexists(keys.JOIN_TOKENS, hash_token(token)):
        raise errors.Unauthorized("unknown join token")


def new_session_token(node_id: str) -> str:
    """A node's session token carries its node id, so node calls whose path names only a job (progress,
    artifacts) know which node is calling; the secret part is what is checked."""
    return f"cwn.{node_id}.{secrets.token_urlsafe(32)}"


def session_node_id(token: str) -> str | None:
    """The node id a session token names, or None when the token is not one (wrong kind, no secret, or
    anything but a well-formed node id)."""
    kind, _, rest = token.partition(".")
    node_id, _, secret = rest.partition(".")
    return node_id if kind == "cwn" and secret and NODE_ID_RE.fullmatch(node_id) else None


def session_claim(authorization: str | None) -> tuple[str | None, str]:
    """(the node id a session token names, or None; the token's digest), without asking the store:
    for node calls whose one script checks the digest itself (HEARTBEAT, REPORT_PROGRESS), so a
    heartbeat or a progress report is one round trip. A missing or malformed header is 401 here."""
    token = bearer_token(authorization)
    return session_node_id(token), hash_token(token)


async def authenticate_node_token(store: Store, authorization: str | None) -> str:
    """The node id of a valid session token; 401 for anything else (a lapsed node must register again)."""
    token = bearer_token(authorization)
    node_id = session_node_id(token)
    stored = await store.redis.hget(keys.node_key(node_id), "token_hash") if node_id else None
    if stored is None or not hmac.compare_digest(stored, hash_token(token)):
        raise errors.Unauthorized("unknown node session token (if the node's heartbeat lapsed, register again)")
    return node_id  # type: ignore[return-value]


async def authenticate_node(store: Store, node_id: str, authorization: str | None) -> None:
    """Pass when the token is this node's session token: another node's token is 403."""
    caller = await authenticate_node_token(store, authorization)
    if caller != node_id:
        raise errors.Forbidden(f"this session token belongs to node {caller}, not {node_id}")


async def authenticate_node_or_admin(store: Store, node_id: str, authorization: str | None) -> None:
    """For DELETE /v1/nodes/{id}: the node itself, or an admin API key."""
    token = bearer_token(authorization)
    raw = await store.redis.hget(keys.API_KEYS, hash_token(token))
    if raw is not None:
        if not orjson.loads(raw).get("admin"):
            raise errors.Forbidden("only an admin API key or the node itself may drain a node")
        return
    await authenticate_node(store, node_id, authorization)


async def create_api_key(store: Store, tenant: str, *, admin: bool = False) -> str:
    """Store a new API key for a tenant and return it (the only time it is seen in clear)."""
    if tenant == ADMIN_TENANT and not admin:
        raise errors.InvalidField(f"tenant {ADMIN_TENANT!r} is reserved for the admin key's own jobs", field="tenant")
    if not TENANT_RE.fullmatch(tenant):
        raise errors.InvalidField("tenant must be 1-63 of a-z, 0-9, '_' and '-', starting with a letter or digit",
                                  field="tenant")
    token = new_token("cwk")
    key_hash = hash_token(token)
    entry = orjson.dumps({"tenant": tenant, "admin": admin, "created": int(time.time()),
                          "key_id": key_id_of(key_hash)})
    async with store.redis.pipeline(transaction=True) as pipe:
        pipe.hset(keys.API_KEYS, key_hash, entry)
        pipe.hset(keys.API_KEY_IDS, key_id_of(key_hash), key_hash)
        pipe.sadd(keys.TENANTS, tenant)
        await pipe.execute()
    return token


async def install_credentials(store: Store, *, admin_key: str, join_token: str) -> None:
    """Make sure the admin key and join token of a credentials file are known to this store (idempotent);
    the admin key gets its id like any other key."""
    key_hash = hash_token(admin_key)
    entry = orjson.dumps({"tenant": ADMIN_TENANT, "admin": True, "created": int(time.time()),
                          "key_id": key_id_of(key_hash)})
    async with store.redis.pipeline(transaction=True) as pipe:
        pipe.hsetnx(keys.API_KEYS, key_hash, entry)
        pipe.hsetnx(keys.API_KEY_IDS, key_id_of(key_hash), key_hash)
        pipe.hsetnx(keys.JOIN_TOKENS, hash_token(join_token), int(time.time()))
        pipe.sadd(keys.TENANTS, ADMIN_TENANT)
        await pipe.execute()


async def list_api_keys(store: Store) -> list[dict[str, Any]]:
    """Every API key as ``{"key_id", "tenant", "admin", "created"}``, oldest first; never the key.

    A key stored before keys had ids is listed with its derived id, and that id is added to
    :data:`keys.API_KEY_IDS` (only that index: :data:`keys.API_KEYS` is not written here, so a key revoked
    meanwhile cannot come back)."""
    stored = await store.redis.hgetall(keys.API_KEYS)
    listed = []
    missing: dict[str, str] = {}
    for key_hash, raw in stored.items():
        entry = orjson.loads(raw)
        key_id = entry.get("key_id") or key_id_of(key_hash)
        if "key_id" not in entry:
            missing[key_id] = key_hash
        listed.append({"key_id": key_id, "tenant": entry["tenant"], "admin": bool(entry.get("admin")),
                       "created": rfc3339(int(entry.get("created") or 0) * 1000)})
    if missing:
        async with store.redis.pipeline(transaction=False) as pipe:
            for key_id, key_hash in missing.items():
                pipe.hsetnx(keys.API_KEY_IDS, key_id, key_hash)
            await pipe.execute()
    return sorted(listed, key=lambda key: (key["created"] or "", key["key_id"]))


async def revoke_api_key(store: Store, who: Principal, key_id: str) -> dict[str, Any]:
    """Delete an API key by its id (admin): 404 for an unknown id, 409 for the key making the request
    (an admin locking itself out is never what was meant). The key answers 401 from then on."""
    if not who.admin:
        raise errors.Forbidden("only an admin API key may revoke API keys")
    if not KEY_ID_RE.fullmatch(key_id):
        raise errors.NotFound(f"no API key {key_id!r} (key ids look like k-0123456789abcdef)")
    if key_id == who.key_id:
        raise errors.Conflict(f"{key_id} is the key making this request; revoke it with another admin key",
                              code="own_key")
    key_hash = await store.redis.hget(keys.API_KEY_IDS, key_id)
    if key_hash is None:  # a key stored before ids existed, never listed since
        key_hash = next((h for h in await store.redis.hkeys(keys.API_KEYS) if key_id_of(h) == key_id), None)
    if key_hash is None:
        raise errors.NotFound(f"no API key {key_id}")
    async with store.redis.pipeline(transaction=True) as pipe:
        pipe.hget(keys.API_KEYS, key_hash)
        pipe.hdel(keys.API_KEYS, key_hash)
        pipe.hdel(keys.API_KEY_IDS, key_id)
        raw, removed, _ = await pipe.execute()
    if not removed:
        raise errors.NotFound(f"no API key {key_id}")
    return {"key_id": key_id, "tenant": orjson.loads(raw)["tenant"], "revoked": True}


async def authenticate_job_reader(store: Store, job_id: str, authorization: str | None,
                                  task_id: str | None = None) -> None:
    """For artifact downloads: an API key that may see the job, the session token of the node that
    holds the job's current attempt (it resumes from a checkpoint), or that of the node replaying one of
    its segments for an audit (``task_id``, the verification task it holds). The token is checked before
    the job is looked at, so an unknown token learns nothing about which jobs exist: 401, then 403/404."""
    token = bearer_token(authorization)
    raw = await store.redis.hget(keys.API_KEYS, hash_token(token))
    caller = None if raw is not None else await authenticate_node_token(store, authorization)
    tenant, node_id, attempt = await store.redis.hmget(keys.job_key(job_id), ["tenant", "node_id", "attempt"])
    if tenant is None:
        raise errors.NotFound(f"no job {job_id}")
    if raw is not None:
        entry = orjson.loads(raw)
        if not entry.get("admin") and tenant != entry["tenant"]:
            raise errors.NotFound(f"no job {job_id}")
        return
    if caller == node_id:
        return
    members = await store.redis.hget(keys.job_key(job_id), f"nodes:{attempt}") if node_id else None
    if members and caller in orjson.loads(members):  # every rank of a gang resumes from the checkpoint
        return
    if task_id:
        task_job, task_node, status = await store.redis.hmget(keys.verify_key(task_id), ["job_id", "node_id", "status"])
        if task_job == job_id and task_node == caller and status == "assigned":
            return
    raise errors.Forbidden(f"job {job_id} is not assigned to node {caller}")
