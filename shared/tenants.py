"""Tenants' limits and usage: the queued and running jobs each tenant may have.

Defaults come from settings (``CYXWIZ_MAX_QUEUED_JOBS``, ``CYXWIZ_MAX_RUNNING_JOBS``); an admin may set
a tenant's own in its hash (:func:`shared.keys.tenant_key`). The scripts read the same fields: submit
refuses past ``max_queued_jobs`` (429 ``quota_exceeded``), placement holds a tenant's jobs back at
``max_running_jobs`` (their ``pending_reason`` is ``tenant_limit``).
"""

from __future__ import annotations

from typing import Any

from shared import errors, keys
from shared.auth import TENANT_RE
from shared.store import Store

LIMITS = ("max_queued_jobs", "max_running_jobs")
MAX_LIMIT = 1_000_000


async def _known(store: Store, tenant: str) -> None:
    if not TENANT_RE.fullmatch(tenant) or not await store.redis.sismember(keys.TENANTS, tenant):
        raise errors.NotFound(f"no tenant {tenant}")


async def get_tenant(store: Store, tenant: str) -> dict[str, Any]:
    """A tenant's limits (its own, else the defaults) and what it uses now."""
    await _known(store, tenant)
    async with store.redis.pipeline(transaction=False) as pipe:
        pipe.hmget(keys.tenant_key(tenant), list(LIMITS))
        for status in ("queued", "assigned", "running"):
            pipe.zcard(keys.jobs_index_key(tenant, status))
        own, queued, assigned, running = await pipe.execute()
    defaults = (store.settings.max_queued_jobs, store.settings.max_running_jobs)
    return {
        "tenant": tenant,
        "max_queued_jobs": int(own[0]) if own[0] is not None else defaults[0],
        "max_running_jobs": int(own[1]) if own[1] is not None else defaults[1],
        "custom_limits": [name for name, value in zip(LIMITS, own, strict=True) if value is not None],
        "queued_jobs": queued,
        "running_jobs": assigned + running,
    }


async def set_limits(store: Store, tenant: str, body: Any) -> dict[str, Any]:
    """Set (an integer) or reset to the default (null) each limit the body names."""
    if not isinstance(body, dict):
        raise errors.MalformedBody("the body must be a JSON object")
    unknown = sorted(set(body) - set(LIMITS))
    if unknown:
        raise errors.InvalidField(f"unknown field {unknown[0]!r}: the limits are {', '.join(LIMITS)}",
                                  field=unknown[0])
    for name, value in body.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value <= MAX_LIMIT):
            raise errors.InvalidField(f"{name} must be an integer from 0 to {MAX_LIMIT}, or null for the default",
                                      field=name)
    await _known(store, tenant)
    async with store.redis.pipeline(transaction=True) as pipe:
        for name, value in body.items():
            if value is None:
                pipe.hdel(keys.tenant_key(tenant), name)
            else:
                pipe.hset(keys.tenant_key(tenant), name, value)
        await pipe.execute()
    return await get_tenant(store, tenant)
