"""The state store's users: one ACL user per role, and one per node.

The store (Redis >= 7 or Valkey) runs with its ``default`` user disabled, so a connection without
credentials is refused (NOAUTH). Three kinds of user:

- ``cyxwiz-admin``: everything. Operators and ``redis-cli`` (``redis_url`` in ``credentials.json``).
- ``cyxwiz-gateway``: the functions. Every non-dangerous command on ``cyxwiz:*`` keys, plus
  ``ACL SETUSER``/``ACL DELUSER`` to manage node users. No FLUSHALL, CONFIG, KEYS, DEBUG, SHUTDOWN...
- ``node-<node_id>``: one per registered node, created at registration. It may only read and
  acknowledge that node's own assignment stream (``XREADGROUP``, ``XACK``, ``XDEL``, ``PING``);
  every other command or key answers NOPERM. Its password is stored nowhere in clear: the node hash
  keeps its SHA-256 (``stream_secret_hash``), which is also how ACL rules name a password (``#<hex>``),
  so the user can be recreated after a restart of the store without ever knowing the password.

Scripts cannot run ACL commands, so a node removed inside a script (reaped, drained) is put on
:data:`shared.keys.NODE_USERS_TO_DELETE`, and every gateway's reaper timer deletes those users.
"""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from shared import keys
from shared.auth import hash_token

ADMIN_USER = "cyxwiz-admin"
GATEWAY_USER = "cyxwiz-gateway"
NODE_USER_PREFIX = "node-"

ADMIN_RULES = ["~*", "&*", "+@all"]
# ACL SETUSER can grant anything, so the gateway is as trusted as an operator; the exclusions keep a
# bug (or an injected command) from flushing, reconfiguring or scanning the store.
GATEWAY_RULES = ["~" + keys.PREFIX + "*", "resetchannels", "+@all", "-@dangerous", "+acl|setuser", "+acl|deluser"]
NODE_COMMANDS = ["+xreadgroup", "+xack", "+xdel", "+ping"]


def secret_hash(password: str) -> str:
    """How a password is named in an ACL rule (``#<sha256 hex>``) and stored in a node hash: the same
    digest as every token's stored form."""
    return hash_token(password)


def new_password() -> str:
    return secrets.token_urlsafe(32)


def node_user(node_id: str) -> str:
    return NODE_USER_PREFIX + node_id


def node_rules(node_id: str, password_hash: str) -> list[str]:
    """The ACL rules of a node's user: its own assignment stream, read and acknowledge only."""
    return ["reset", "on", "#" + password_hash, "resetchannels", "~" + keys.node_stream_key(node_id),
            "-@all", *NODE_COMMANDS]


def acl_file_line(user: str, password_hash: str, rules: list[str]) -> str:
    return " ".join(["user", user, "on", "#" + password_hash, *rules])


def _rebuild(url: str, *, credentials: str | None = None, host: str | None = None, port: int | None = None) -> str:
    """``url`` with its credentials (``user:password@`` as given; None keeps them), host and port
    replaced; scheme, database and query kept. IPv6 hosts are bracketed."""
    parts = urlsplit(url)
    if credentials is None:
        credentials = parts.netloc.rpartition("@")[0] + "@" if "@" in parts.netloc else ""
    host = host or parts.hostname or "127.0.0.1"
    netloc = credentials + (f"[{host}]" if ":" in host else host)
    if port or parts.port:
        netloc += f":{port or parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def with_credentials(url: str, user: str, password: str) -> str:
    """``url`` with ``user:password@`` in place of any credentials it had."""
    return _rebuild(url, credentials=f"{quote(user, safe='')}:{quote(password, safe='')}@")


def without_credentials(url: str) -> str:
    """``url`` with no user or password: the store's address, safe to show and to hand to nodes."""
    return _rebuild(url, credentials="")


def with_host(url: str, host: str, port: int | None = None) -> str:
    """``url`` pointing at another host (and port, if given), credentials and database kept."""
    return _rebuild(url, host=host, port=port)


LOOPBACK_OR_ANY = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::", "")


def node_store_address(store_url: str, public_url: str, request_host: str | None) -> str:
    """The store address (no credentials) a node should use: ``public_url`` when the operator set one
    (``CYXWIZ_NODE_STORE_URL``), else the gateway's own store address; a loopback or wildcard host
    there is replaced by the host the node used to reach the gateway (the store runs beside it)."""
    if public_url:
        return without_credentials(public_url)
    address = without_credentials(store_url)
    host = urlsplit(address).hostname or ""
    if host in LOOPBACK_OR_ANY and request_host:
        return with_host(address, request_host)
    return address


async def create_node_user(redis: Any, node_id: str, password_hash: str) -> None:
    """Create (or recreate, idempotently) a node's store user."""
    await redis.execute_command("ACL", "SETUSER", node_user(node_id), *node_rules(node_id, password_hash))


async def delete_node_users(redis: Any, node_ids: list[str]) -> None:
    if node_ids:
        await redis.execute_command("ACL", "DELUSER", *(node_user(n) for n in node_ids))


async def delete_pending_node_users(redis: Any, batch: int = 500) -> int:
    """Delete the users of nodes that scripts removed (reaped, drained); how many were deleted."""
    node_ids = await redis.spop(keys.NODE_USERS_TO_DELETE, batch)
    await delete_node_users(redis, node_ids or [])
    return len(node_ids or [])


async def restore_node_users(redis: Any) -> int:
    """Recreate the user of every registered node from its stored password digest (after the store
    restarted without them: ACL SETUSER users live in memory only); how many."""
    node_ids = await redis.zrange(keys.NODES_DEADLINE, 0, -1)
    restored = 0
    for start in range(0, len(node_ids), 1000):
        chunk = node_ids[start:start + 1000]
        async with redis.pipeline(transaction=False) as pipe:
            for node_id in chunk:
                pipe.hget(keys.node_key(node_id), "stream_secret_hash")
            digests = await pipe.execute()
        async with redis.pipeline(transaction=False) as pipe:
            for node_id, digest in zip(chunk, digests, strict=True):
                if digest:
                    pipe.execute_command("ACL", "SETUSER", node_user(node_id), *node_rules(node_id, digest))
                    restored += 1
            await pipe.execute()
    return restored
