"""Each Lua script against the real server, including running it twice (scripts must be safe to
retry: a client that lost the answer will send the same call again)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from shared import errors, keys
from shared.settings import Settings
from shared.store import SCRIPTS, Store

W = [0.4, 0.3, 0.2, 0.1]


def alone(redis_url: str) -> str:
    """Database 1 of the session's store: the session gateway, whose reaper timer runs a script every
    0.25 s against database 0, never touches it, so these scripts run alone and the clock is theirs."""
    return redis_url.rsplit("/", 1)[0] + "/1"


@pytest.fixture()
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(alone(redis_url), decode_responses=True)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture()
async def store(r: redis.Redis, redis_url: str) -> AsyncIterator[Store]:
    s = Store(Settings.from_env({"CYXWIZ_REDIS_URL": alone(redis_url)}))
    yield s
    await s.close()


async def register(store: Store, node_id: str, slots: int = 1, gpu: int = 0, ttl_ms: int = 60000,
                   name: str | None = None, node_key_hash: str = "") -> list[str]:
    """REGISTER_NODE as register_node calls it; the name is the node id unless given, and a new name's
    issued key digest is ``key-<name>``."""
    name = name or node_id
    return await store.run("REGISTER_NODE", [node_id, name, slots, "gpu" if gpu else "cpu", gpu, 0, 1000,
                                             "{}", "{}", "hash", ttl_ms, 0.1, *W, node_key_hash, f"key-{name}",
                                             "stream-digest"])


async def submit(store: Store, job_id: str, idem: str = "", gpu: int = 0) -> list[str]:
    return await store.run("SUBMIT_JOB", [job_id, "t", idem, "job", "normal", 1, 3, "{}", gpu, 0, 0, "{}"])


def state(r: redis.Redis) -> dict[str, bytes]:
    """Every key's serialized value, less the control plane's pulse (every script marks the time)."""
    return {k: r.dump(k) for k in r.keys("*") if not k.startswith(keys.PREFIX + "plane:")}


def test_every_script_is_tested() -> None:
    tested = {"REGISTER_NODE", "HEARTBEAT", "DRAIN_NODE", "REAP", "SUBMIT_JOB", "CANCEL_JOB", "REPORT_PROGRESS",
              "CHECK_UPLOAD", "COMMIT_ARTIFACT"}
    assert set(SCRIPTS) == tested


async def test_register_twice_keeps_one_node_and_group(store: Store, r: redis.Redis) -> None:
    assert await register(store, "n1", slots=2) == ["ok", 0, 1]  # a new name: its key is issued
    before = state(r)
    for _ in range(2):  # the same call again: refused whole (the name is taken, and then live)
        with pytest.raises(errors.Conflict, match="another node identity"):
            await register(store, "n1", slots=2)
        with pytest.raises(errors.Conflict, match="still registered"):
            await register(store, "n1", slots=2, node_key_hash="key-n1")
    assert state(r) == before
    assert r.zcard(keys.NODES_SCORE) == 1 and len(r.xinfo_groups(keys.node_stream_key("n1"))) == 1
    assert r.hget(keys.node_key("n1"), "running") == "0"


async def test_a_name_belongs_to_its_key_and_a_draining_registration_gives_way(store: Store, r: redis.Redis) -> None:
    assert await register(store, "n-old", name="host") == ["ok", 0, 1]
    await submit(store, "j1")
    with pytest.raises(errors.Conflict, match="another node identity"):
        await register(store, "n-impostor", name="host", node_key_hash="key-guessed")
    assert not r.exists(keys.node_key("n-impostor")) and r.hget(keys.NODE_BY_NAME, "host") == "n-old"
    await store.run("DRAIN_NODE", ["n-old"])  # a SIGTERM: it drains, then the runtime restarts at once
    assert await register(store, "n-new", name="host", node_key_hash="key-host") == ["ok", 1, 0]
    assert not r.exists(keys.node_key("n-old")) and r.sismember(keys.NODE_USERS_TO_DELETE, "n-old")
    job = r.hgetall(keys.job_key("j1"))  # handed back without spending an attempt, and placed again
    assert job["node_id"] == "n-new" and job["attempt"] == "2" and job["lost_count"] == "0"
    assert r.hget(keys.NODE_BY_NAME, "host") == "n-new" and r.hget(keys.REPUTATION, "host") == "0.75"


async def test_a_control_plane_outage_reaps_no_node_that_was_alive_when_it_began(store: Store, r: redis.Redis) -> None:
    await register(store, "alive-at-outage")
    await register(store, "dead-before-outage")
    now = int(r.time()[0]) * 1000
    r.set(keys.PLANE_PULSE, now - 120_000)  # nothing ran for two minutes: gateway and store were down
    r.zadd(keys.NODES_DEADLINE, {"alive-at-outage": now - 60_000, "dead-before-outage": now - 130_000})
    assert await store.run("REAP", []) == ["dead-before-outage"]
    deadline = r.zscore(keys.NODES_DEADLINE, "alive-at-outage")
    assert deadline is not None and deadline >= now + 59_000  # a whole TTL from now to heartbeat again
    assert await store.run("REAP", []) == []
    assert int(r.get(keys.PLANE_RESUMED) or 0) >= now


async def test_submit_twice_with_idempotency_key(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    first = await submit(store, "j1", idem="k")
    second = await submit(store, "j2", idem="k")
    assert first == ["created", "j1", "assigned", "n1"] and second == ["existing", "j1", "assigned", "n1"]
    assert not r.exists(keys.job_key("j2")) and r.hget(keys.node_key("n1"), "running") == "1"


async def test_submit_twice_without_key_fills_then_queues(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    assert (await submit(store, "j1"))[2] == "assigned"
    assert (await submit(store, "j2"))[2] == "queued"
    assert r.zrange(keys.queue_key("cpu"), 0, -1) == ["j2"]


async def test_heartbeat_twice(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    await submit(store, "j1")
    await store.run("CANCEL_JOB", ["j1", ""])
    assert await store.run("HEARTBEAT", ["n1", ""]) == ["ok", "online", 0, "", "j1"]
    assert await store.run("HEARTBEAT", ["n1", ""]) == ["ok", "online", 0, ""]
    # a node that cannot read its stream is not scheduled, and gets its store user's digest back
    assert await store.run("HEARTBEAT", ["n1", "", "", "ConnectionError"]) == ["ok", "online", 0, "stream-digest"]
    assert r.zcard(keys.nodes_free_key("cpu")) == 0
    assert (await submit(store, "j2"))[2] == "queued"
    assert await store.run("HEARTBEAT", ["n1", "", "", ""]) == ["ok", "online", 1, ""]
    with pytest.raises(errors.NotFound):
        await store.run("HEARTBEAT", ["ghost", ""])


async def test_cancel_twice(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    await submit(store, "j1")
    assert await store.run("CANCEL_JOB", ["j1", ""]) == ["ok", "cancelled"]
    assert await store.run("CANCEL_JOB", ["j1", ""]) == ["terminal", "cancelled"]
    assert r.hget(keys.node_key("n1"), "running") == "0"
    with pytest.raises(errors.NotFound):
        await store.run("CANCEL_JOB", ["j1", "other-tenant"])


async def test_report_twice_is_recorded_once(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    await submit(store, "j1")
    args = ["j1", "n1", 1, 1, "running", '{"step": 1}', '{"seq": 1}', "", "job"]
    assert await store.run("REPORT_PROGRESS", args) == ["ok", "running"]
    assert await store.run("REPORT_PROGRESS", args) == ["duplicate", "running"]
    assert r.xlen(keys.job_progress_key("j1")) == 1


async def test_completion_twice(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    await submit(store, "j1")
    r.hset("cyxwiz:job:j1:upload:model.safetensors:u", mapping={"size": 1, "0": "x"})
    await store.run("COMMIT_ARTIFACT", ["j1", "n1", 1, "model.safetensors", 1, 100],
                    keys=["cyxwiz:job:j1:upload:model.safetensors:u", keys.artifact_key("j1", "model.safetensors")])
    args = ["j1", "n1", 1, 2, "completed", "{}", "{}", "", "job"]
    assert await store.run("REPORT_PROGRESS", args) == ["ok", "completed"]
    assert await store.run("REPORT_PROGRESS", args) == ["duplicate", "completed"]  # same seq: a retry
    with pytest.raises(errors.Conflict):
        await store.run("REPORT_PROGRESS", ["j1", "n1", 1, 3, "completed", "{}", "{}", "", "job"])
    assert r.hget(keys.node_key("n1"), "running") == "0" and r.zcard(keys.jobs_index_key(None, "completed")) == 1


async def test_commit_artifact_twice_without_upload_fails_cleanly(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    await submit(store, "j1")
    upload = "cyxwiz:job:j1:upload:a:u"
    target = keys.artifact_key("j1", "a")
    r.hset(upload, mapping={"size": 3, "0": "abc"})
    assert await store.run("COMMIT_ARTIFACT", ["j1", "n1", 1, "a", 3, 100], keys=[upload, target]) == ["ok"]
    with pytest.raises(redis.exceptions.ResponseError):  # the upload key is gone: nothing to rename
        await store.run("COMMIT_ARTIFACT", ["j1", "n1", 1, "a", 3, 100], keys=[upload, target])
    assert r.hget(keys.job_key("j1"), "artifacts") == '["a"]'


async def test_drain_twice(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    await submit(store, "j1")
    assert await store.run("DRAIN_NODE", ["n1"]) == ["ok", "draining"]
    assert await store.run("DRAIN_NODE", ["n1"]) == ["ok", "draining"]
    assert r.zcard(keys.nodes_free_key("cpu")) == 0


async def test_reap_twice(store: Store, r: redis.Redis) -> None:
    import asyncio

    await register(store, "dead", ttl_ms=300)
    await submit(store, "j1")
    await asyncio.sleep(0.4)
    assert await store.run("REAP", []) == ["dead"]
    assert await store.run("REAP", []) == []
    job = r.hgetall(keys.job_key("j1"))
    assert job["status"] == "queued" and job["attempt"] == "2" and job["lost_count"] == "1"
    await register(store, "alive")
    assert r.hget(keys.job_key("j1"), "node_id") == "alive"


async def test_node_scripts_check_the_session_digest_before_any_change(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")  # its stored digest is "hash"
    await submit(store, "j1")
    before = state(r)
    for _ in range(2):
        with pytest.raises(errors.Unauthorized):
            await store.run("HEARTBEAT", ["n1", "", "hasX"])
        with pytest.raises(errors.Unauthorized):
            await store.run("REPORT_PROGRESS", ["j1", "n1", 1, 1, "running", "{}", "{}", "", "job", "has"])
    assert state(r) == before
    assert (await store.run("HEARTBEAT", ["n1", "", "hash"]))[0] == "ok"


async def test_check_upload_twice(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    await register(store, "n2")
    await submit(store, "j1")
    holder = r.hget(keys.job_key("j1"), "node_id")
    other = "n2" if holder == "n1" else "n1"
    before = state(r)
    for _ in range(2):
        assert await store.run("CHECK_UPLOAD", ["j1", holder, 1]) == ["ok"]
        with pytest.raises(errors.Forbidden):
            await store.run("CHECK_UPLOAD", ["j1", other, 1])
    assert state(r) == before
    await store.run("CANCEL_JOB", ["j1", ""])
    with pytest.raises(errors.Conflict):
        await store.run("CHECK_UPLOAD", ["j1", holder, 1])
