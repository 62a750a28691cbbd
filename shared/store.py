"""The connection to the state store (Redis >= 6.2 or Valkey) and the registered Lua scripts.

One :class:`Store` per process. Its clients time out fast and never retry on their own, so a
Redis that is down or hung turns into :class:`~shared.errors.StoreUnavailable` (503 with
Retry-After) within ``redis_timeout_s``, instead of a hung or 500 response.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import errors, lua
from shared.lua_prelude import build_prelude
from shared.settings import Settings

# Script names, as ``Store.run`` takes them.
SCRIPTS = ("REGISTER_NODE", "HEARTBEAT", "DRAIN_NODE", "REAP", "SUBMIT_JOB", "CANCEL_JOB",
           "REPORT_PROGRESS", "CHECK_UPLOAD", "COMMIT_ARTIFACT", "END_UPLOAD", "RENDEZVOUS",
           "VERIFY_RESULT", "OBSERVE", "APPEND_LOGS")

_ERROR_CODES: dict[str, type[errors.ApiError]] = {
    "unauthorized": errors.Unauthorized,
    "not_found": errors.NotFound,
    "forbidden": errors.Forbidden,
    "job_cancelled": errors.Conflict,
    "stale_attempt": errors.Conflict,
    "job_terminal": errors.Conflict,
    "missing_artifact": errors.Conflict,
    "payload_too_large": errors.PayloadTooLarge,
    "upload_replaced": errors.Conflict,
    "quota_exceeded": errors.QuotaExceeded,
    "invalid_artifact": errors.InvalidField,
    "invalid_field": errors.InvalidField,
    "node_banned": errors.Forbidden,
}


def is_unavailable(exc: BaseException) -> bool:
    """True for the errors that mean "the store is down, slow or restarting" (a 503, not a 500)."""
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError)):
        return True
    if isinstance(exc, ResponseError):
        text = str(exc)
        return text.startswith(("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN"))
    return False


def is_full(exc: BaseException) -> bool:
    """True when the store refused a write because it is at its maxmemory (noeviction): a 507."""
    return isinstance(exc, OutOfMemoryError) or (isinstance(exc, ResponseError) and str(exc).startswith("OOM"))


def make_client(settings: Settings, *, decode: bool, max_connections: int = 256) -> aioredis.Redis:
    """A pooled asyncio client that fails fast instead of retrying."""
    return aioredis.Redis.from_url(
        settings.redis_url,
        decode_responses=decode,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=min(settings.redis_timeout_s, 1.0),
        retry=Retry(NoBackoff(), 0),
        max_connections=max_connections,
    )


class Store:
    """Redis clients (text and bytes) plus the scripts, registered once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = make_client(settings, decode=True)
        self.raw = make_client(settings, decode=False)
        # Event streams block in XREAD for their whole life: their own pool, so however many are open,
        # heartbeats and submits always find a connection (shared.sse admits at most this many).
        self.events = make_client(settings, decode=True, max_connections=settings.max_event_streams)
        self.open_streams: Counter[str] = Counter()  # per tenant, in this process
        prelude = build_prelude(settings)
        self._scripts = {name: self.redis.register_script(prelude + getattr(lua, name)) for name in SCRIPTS}

    async def run(self, name: str, args: list[Any], keys: list[str] | None = None) -> list[Any]:
        """Run one named script; map its ``{'err', code, message}`` answer to an :class:`ApiError`."""
        result = await self._scripts[name](keys=keys or [], args=args)
        if isinstance(result, list) and result and result[0] == "err":
            code, message = result[1], result[2]
            raise _ERROR_CODES.get(code, errors.Conflict)(message, code=code)
        return result  # type: ignore[no-any-return]

    async def close(self) -> None:
        await self.redis.aclose()
        await self.raw.aclose()
        await self.events.aclose()


__all__ = ["Store", "is_full", "is_unavailable", "make_client", "RedisError", "SCRIPTS"]
