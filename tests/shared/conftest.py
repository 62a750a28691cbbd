"""Fixtures of the Lua script tests: a client of database 1 of the session's store, emptied for each test,
and a Store that runs the scripts there (audits off unless a test module overrides ``store``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from shared.settings import Settings
from shared.store import Store


def alone(redis_url: str) -> str:
    """Database 1 of the session's store: the session gateway, whose reaper timer runs a script every
    0.25 s against database 0, never touches it, so these scripts run alone and the clock is theirs."""
    return redis_url.rsplit("/", 1)[0] + "/1"


def script_store(redis_url: str, **env: str) -> Store:
    """A Store on database 1; ``env``: CYXWIZ_* settings (audits are off unless given)."""
    return Store(Settings.from_env({"CYXWIZ_REDIS_URL": alone(redis_url), "CYXWIZ_PROBATION_AUDITS": "0",
                                    "CYXWIZ_AUDIT_FRACTION": "0", **env}))


@pytest.fixture()
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(alone(redis_url), decode_responses=True)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture()
async def store(r: redis.Redis, redis_url: str) -> AsyncIterator[Store]:
    s = script_store(redis_url)
    yield s
    await s.close()
