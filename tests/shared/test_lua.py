"""Each Lua script against the real server, including running it twice (scripts must be safe to
retry: a client that lost the answer will send the same call again)."""

from __future__ import annotations

import orjson
import pytest
import redis

from shared import errors, keys
from shared.store import SCRIPTS, Store

W = [0.4, 0.3, 0.2, 0.1]


async def register(store: Store, node_id: str, slots: int = 1, gpu: int = 0, ttl_ms: int = 60000,
                   name: str | None = None, node_key_hash: str = "", memory_mb: int = 0,
                   labels: str = "{}") -> list[str]:
    """REGISTER_NODE as register_node calls it; the name is the node id unless given, and a new name's
    issued key digest is ``key-<name>``. ``memory_mb`` 0: memory not reported."""
    name = name or node_id
    profile = orjson.dumps({"gpu": gpu, "gpu_mem": 0, "labels": orjson.loads(labels), "mem": memory_mb,
                            "ram": 1000}, option=orjson.OPT_SORT_KEYS).decode()
    return await store.run("REGISTER_NODE", [node_id, name, slots, "gpu" if gpu else "cpu", gpu, 0, 1000,
                                             "{}", labels, "hash", ttl_ms, 0.1, *W, node_key_hash, f"key-{name}",
                                             "stream-digest", memory_mb, memory_mb * slots, profile,
                                             "gpu-x" if gpu else "cpu"])


async def submit(store: Store, job_id: str, idem: str = "", gpu: int = 0, tenant: str = "t", memory_mb: int = 0,
                 priority: str = "normal", labels: str = "{}", max_queued: int = 1000,
                 max_duration_ms: int = 3_600_000) -> list[str]:
    band = {"high": 0, "normal": 1, "low": 2}[priority]
    return await store.run("SUBMIT_JOB", [job_id, tenant, idem, "job", priority, band, 3, "{}", gpu, 0, 0, labels,
                                          memory_mb, max_duration_ms, max_queued])


def state(r: redis.Redis) -> dict[str, bytes]:
    """Every key's serialized value, less the control plane's pulse (every script marks the time)."""
    return {k: r.dump(k) for k in r.keys("*") if not k.startswith(keys.PREFIX + "plane:")}


def test_every_script_is_tested() -> None:
    tested = {"REGISTER_NODE", "HEARTBEAT", "DRAIN_NODE", "REAP", "SUBMIT_JOB", "CANCEL_JOB", "REPORT_PROGRESS",
              "CHECK_UPLOAD", "COMMIT_ARTIFACT", "END_UPLOAD",
              "VERIFY_RESULT", "OBSERVE",  # these two in tests/shared/test_lua_verification.py
              "APPEND_LOGS",  # tests/shared/test_lua_logs.py
              "RENDEZVOUS"}  # tests/shared/test_lua_gang.py
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
    await store.run("CHECK_UPLOAD", upload_args("j1", "n1", "model.safetensors", "u"))
    await store.run("COMMIT_ARTIFACT", ["j1", "n1", 1, "model.safetensors", 1, 100, "u", "weights",
                                        '{"weights": "w"}', 0.5],
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
    await store.run("CHECK_UPLOAD", upload_args("j1", "n1", "a", "u"))
    assert await store.run("COMMIT_ARTIFACT", ["j1", "n1", 1, "a", 3, 100, "u"], keys=[upload, target]) == ["ok"]
    with pytest.raises(errors.Conflict, match="replaced"):  # its reservation is gone: nothing is renamed
        await store.run("COMMIT_ARTIFACT", ["j1", "n1", 1, "a", 3, 100, "u"], keys=[upload, target])
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


def upload_args(job: str, node: str, name: str = "a", upload: str = "u1", size: int = 10,
                cap: int = 100, max_artifacts: int = 3) -> list[object]:
    return [job, node, 1, name, upload, size, cap, max_artifacts, 60_000]


async def test_check_upload_twice(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    await register(store, "n2")
    await submit(store, "j1")
    holder = r.hget(keys.job_key("j1"), "node_id")
    other = "n2" if holder == "n1" else "n1"
    assert await store.run("CHECK_UPLOAD", upload_args("j1", holder)) == ["ok"]
    before = state(r)
    for _ in range(2):  # another node's upload is refused before anything is written
        with pytest.raises(errors.Forbidden):
            await store.run("CHECK_UPLOAD", upload_args("j1", other, name="b"))
    assert state(r) == before
    # the same name again (a retry): the newer upload replaces the older, which can no longer commit
    assert await store.run("CHECK_UPLOAD", upload_args("j1", holder, upload="u2")) == ["ok"]
    r.hset("cyxwiz:job:j1:upload:a:u1", mapping={"size": 1, "0": "x"})
    with pytest.raises(errors.Conflict, match="replaced"):
        await store.run("COMMIT_ARTIFACT", ["j1", holder, 1, "a", 1, 100, "u1"],
                        keys=["cyxwiz:job:j1:upload:a:u1", keys.artifact_key("j1", "a")])
    assert not r.exists("cyxwiz:job:j1:upload:a:u1", keys.artifact_key("j1", "a"))
    for _ in range(2):  # a failed upload drops its own reservation only
        assert await store.run("END_UPLOAD", ["j1", "a", "u1"]) == ["ok"]
    assert r.hexists(keys.job_uploads_key("j1"), "a")
    assert await store.run("END_UPLOAD", ["j1", "a", "u2"]) == ["ok"]
    assert not r.exists(keys.job_uploads_key("j1"))
    await store.run("CANCEL_JOB", ["j1", ""])
    with pytest.raises(errors.Conflict):
        await store.run("CHECK_UPLOAD", upload_args("j1", holder))


async def test_uploads_reserve_their_size_and_count_against_the_job_caps(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    await submit(store, "j1")
    assert await store.run("CHECK_UPLOAD", upload_args("j1", "n1", "a", "u1", size=60)) == ["ok"]
    with pytest.raises(errors.PayloadTooLarge, match="uploads in progress"):  # 60 + 50 > 100 before any commit
        await store.run("CHECK_UPLOAD", upload_args("j1", "n1", "b", "u2", size=50))
    assert await store.run("CHECK_UPLOAD", upload_args("j1", "n1", "b", "u2", size=40)) == ["ok"]
    assert await store.run("CHECK_UPLOAD", upload_args("j1", "n1", "c", "u3", size=0)) == ["ok"]
    with pytest.raises(errors.PayloadTooLarge, match="at most 3 artifacts"):
        await store.run("CHECK_UPLOAD", upload_args("j1", "n1", "d", "u4", size=0))
    r.hset(keys.job_uploads_key("j1"), "a", "u1|60|1")  # a reservation past its expiry (its gateway died)
    assert await store.run("CHECK_UPLOAD", upload_args("j1", "n1", "d", "u4", size=50)) == ["ok"]
    assert r.hkeys(keys.job_uploads_key("j1")) == ["b", "c", "d"]


async def test_a_tenant_over_its_queued_limit_is_refused_and_nothing_changes(store: Store, r: redis.Redis) -> None:
    await submit(store, "j1", max_queued=2)
    await submit(store, "j2", max_queued=2)
    before = state(r)
    for _ in range(2):
        with pytest.raises(errors.QuotaExceeded, match="max_queued_jobs"):
            await submit(store, "j3", max_queued=2)
    assert state(r) == before
    r.hset(keys.tenant_key("t"), "max_queued_jobs", 3)  # an admin's own limit for the tenant wins
    assert (await submit(store, "j3", max_queued=2))[0] == "created"
    assert (await submit(store, "j4", tenant="other", max_queued=2))[0] == "created"


async def test_jobs_no_node_fits_are_parked_and_come_back_for_a_node_that_fits(store: Store, r: redis.Redis) -> None:
    await register(store, "small", memory_mb=1000)
    assert (await submit(store, "big", memory_mb=5000))[2] == "queued"
    assert (await submit(store, "gpu", gpu=1))[2] == "queued"
    assert (await submit(store, "labelled", labels='{"zone": "b"}'))[2] == "queued"
    assert r.zrange(keys.QUEUE_PARKED, 0, -1) == ["big", "gpu", "labelled"]
    assert r.zcard(keys.queue_key("cpu")) == 0 and r.zcard(keys.queue_tenants_key("cpu")) == 0
    assert (await submit(store, "fits", memory_mb=800))[2] == "assigned"
    assert r.hget(keys.node_key("small"), "mem_reserved_mb") == "800"
    assert (await submit(store, "waits", memory_mb=800))[2] == "queued"  # fits the node, not beside the first
    assert r.zrange(keys.queue_key("cpu"), 0, -1) == ["waits"]
    await register(store, "large", memory_mb=8000)  # fits "big" (and takes it): the others stay parked
    assert r.hget(keys.job_key("big"), "node_id") == "large"
    assert r.zrange(keys.QUEUE_PARKED, 0, -1) == ["gpu", "labelled"]
    await register(store, "zone-b", labels='{"zone": "b"}')
    assert r.hget(keys.job_key("labelled"), "node_id") == "zone-b"
    await store.run("DRAIN_NODE", ["zone-b"])  # a draining node can hold no new job: its profile goes
    assert '{"gpu":0,"gpu_mem":0,"labels":{"zone":"b"},"mem":0,"ram":1000}' not in r.hkeys(keys.NODES_PROFILES)


async def test_a_free_node_is_shared_between_tenants_and_never_idle_behind_others(store: Store, r: redis.Redis) -> None:
    await register(store, "n1", slots=2)
    await submit(store, "a0", tenant="a")  # tenant a holds both slots
    await submit(store, "a9", tenant="a")
    for i in range(1, 6):
        await submit(store, f"a{i}", tenant="a", priority="high", labels='{"gpu-model": "none"}')
    for i in range(6, 9):
        await submit(store, f"a{i}", tenant="a")
    await submit(store, "b1", tenant="b")
    assert r.zcard(keys.QUEUE_PARKED) == 5  # unplaceable, out of every scan
    args = ["a0", "n1", 1, 1, "completed", "{}", "{}", "", "job"]
    r.hset(keys.job_key("a0"), mapping={"artifacts": '["model.safetensors"]', "final:1": '{"weights": "w"}'})
    await store.run("REPORT_PROGRESS", args)
    # the freed slot: same band, tenant b holds no slot and tenant a still holds one, so b goes first
    # (though a's jobs are older), and the five high-priority jobs that fit no node never got in the way
    assert r.hget(keys.job_key("b1"), "status") == "assigned"
    assert r.hget(keys.job_key("a6"), "status") == "queued"


async def test_a_hand_back_never_lands_on_the_same_node_and_is_counted(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    await register(store, "n2")
    await submit(store, "j1")
    await submit(store, "j2")  # both nodes busy
    holder, other = r.hget(keys.job_key("j1"), "node_id"), r.hget(keys.job_key("j2"), "node_id")
    await store.run("REPORT_PROGRESS", ["j1", holder, 1, 1, "queued", "", "{}", "", "job"])
    job = r.hgetall(keys.job_key("j1"))
    assert job["status"] == "queued" and job["handbacks"] == "1" and job["avoid_node"] == holder
    await store.run("HEARTBEAT", [holder, ""])
    assert r.hget(keys.job_key("j1"), "status") == "queued"  # not straight back: another node could hold it
    r.hset(keys.job_key("j2"), mapping={"artifacts": '["model.safetensors"]', "final:1": '{"weights": "w"}'})
    await store.run("REPORT_PROGRESS", ["j2", other, 1, 1, "completed", "{}", "{}", "", "job"])
    assert r.hget(keys.job_key("j1"), "node_id") == other
    await store.run("DRAIN_NODE", [other])  # the only node that fits may take a job it handed back
    await store.run("REPORT_PROGRESS", ["j1", other, 2, 1, "queued", "", "{}", "", "job"])
    await store.run("HEARTBEAT", [holder, ""])
    assert r.hget(keys.job_key("j1"), "node_id") == holder


async def test_the_same_failure_on_two_nodes_is_the_jobs_fault(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    await register(store, "n2")
    await submit(store, "j1")
    first = r.hget(keys.job_key("j1"), "node_id")
    error = "the job process was killed by signal SIGKILL (out of memory?) after 12 s"
    await store.run("REPORT_PROGRESS", ["j1", first, 1, 1, "failed", "", "{}", error, "node"])
    assert float(r.hget(keys.REPUTATION, first)) < 0.75  # charged: for now it looks like the node's fault
    second = r.hget(keys.job_key("j1"), "node_id")
    assert second not in (first, "")  # the retry goes to the other node
    await store.run("REPORT_PROGRESS", ["j1", second, 2, 1, "failed", "", "{}", error.replace("12", "40"), "node"])
    job = r.hgetall(keys.job_key("j1"))
    assert job["status"] == "failed" and "the job's fault" in job["error"]
    assert r.hget(keys.REPUTATION, "n1") == "0.75" and r.hget(keys.REPUTATION, "n2") == "0.75"


async def test_retention_purges_finished_jobs_and_forgotten_names(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    await submit(store, "old")
    await store.run("CANCEL_JOB", ["old", ""])
    r.hset(keys.artifact_key("old", "a"), "size", 1)
    r.hset(keys.job_key("old"), "artifacts", '["a"]')
    await store.run("DRAIN_NODE", ["n1"])  # the name is no longer registered
    await submit(store, "young")
    long_ago = int(r.time()[0]) * 1000 - 31 * 86_400_000
    r.zadd(keys.JOBS_FINISHED, {"old": long_ago})
    r.zadd(keys.NODES_LAST_SEEN, {"n1": long_ago})
    for _ in range(2):
        await store.run("REAP", [])
    assert not r.exists(keys.job_key("old"), keys.artifact_key("old", "a"), keys.job_progress_key("old"))
    assert r.zrange(keys.jobs_index_key(None, None), 0, -1) == ["young"]
    assert not r.hexists(keys.REPUTATION, "n1") and not r.hexists(keys.NODE_IDENTITIES, "n1")


async def test_a_job_past_its_wall_clock_limit_fails_and_its_node_hears_of_it(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    await submit(store, "j1", max_duration_ms=60_000)
    await store.run("REPORT_PROGRESS", ["j1", "n1", 1, 1, "running", "", "{}", "", "job"])
    deadline = r.zscore(keys.JOBS_DEADLINE, "j1")
    assert deadline is not None
    r.zadd(keys.JOBS_DEADLINE, {"j1": deadline - 61_000})
    for _ in range(2):
        await store.run("REAP", [])
    job = r.hgetall(keys.job_key("j1"))
    assert job["status"] == "failed" and "max_duration_s = 60 s" in job["error"]
    assert r.smembers(keys.node_cancels_key("n1")) == {"j1"} and r.hget(keys.node_key("n1"), "running") == "0"


async def test_the_reaper_sweep_unparks_and_parks_whatever_the_queue_holds(store: Store, r: redis.Redis) -> None:
    for i in range(250):  # more than one registration looks at, all of one tenant, all high priority
        await submit(store, f"hog{i}", tenant="hog", priority="high", labels='{"zone": "nowhere"}')
    await submit(store, "small", tenant="b", labels='{"zone": "x"}')
    assert r.zcard(keys.QUEUE_PARKED) == 251
    await register(store, "n1", labels='{"zone": "y"}', slots=2)  # fits none of them
    await register(store, "n2", labels='{"zone": "x"}')  # fits "small": back in its queue, and placed
    assert r.hget(keys.job_key("small"), "node_id") == "n2"
    await submit(store, "later", tenant="b", labels='{"zone": "y"}')
    await submit(store, "later2", tenant="b", labels='{"zone": "y"}')
    await submit(store, "waits", tenant="b", labels='{"zone": "y"}')  # n1 is full: queued, not parked
    assert r.zscore(keys.queue_key("cpu"), "waits") is not None
    await store.run("DRAIN_NODE", ["n1"])  # n1 drains: the last node with zone y; "waits" fits no node
    await store.run("REAP", [])  # each tick looks at 200 jobs of each set, then goes on from there
    assert r.zscore(keys.QUEUE_PARKED, "waits") is not None
    assert r.exists(keys.sweep_cursor_key(keys.QUEUE_PARKED))
    await store.run("REAP", [])
    assert not r.exists(keys.sweep_cursor_key(keys.QUEUE_PARKED))  # the walk came round to the start


async def test_a_node_registered_before_profiles_is_counted_at_its_heartbeat(store: Store, r: redis.Redis) -> None:
    await register(store, "old", labels='{"zone": "a"}')
    profile = r.hget(keys.node_key("old"), "profile")
    r.hdel(keys.node_key("old"), "profile")
    r.delete(keys.NODES_PROFILES)
    await store.run("HEARTBEAT", ["old", ""])
    rebuilt = r.hget(keys.node_key("old"), "profile")
    assert rebuilt and orjson.loads(rebuilt)["labels"] == {"zone": "a"} and profile
    assert r.hgetall(keys.NODES_PROFILES) == {rebuilt: "1"}


async def test_tenants_whose_jobs_fit_only_busy_nodes_do_not_hide_another_tenant(store: Store, r: redis.Redis) -> None:
    await register(store, "big", memory_mb=100_000)
    await submit(store, "blocker", memory_mb=95_000)  # the big node is full
    for i in range(70):  # more tenants than a pull looks at by offers, each with a job only "big" can hold
        await submit(store, f"huge{i}", tenant=f"t{i}", priority="high", memory_mb=90_000)
    await submit(store, "small", tenant="z", priority="low", memory_mb=500)
    assert r.zcard(keys.QUEUE_PARKED) == 0  # they fit a live node: queued, not parked
    await register(store, "little", memory_mb=1000)
    assert r.hget(keys.job_key("small"), "node_id") == "little"
