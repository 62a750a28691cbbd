"""Multi-node jobs (gangs) in the scripts, against the real server: all-or-nothing placement, no partial
holds, the rendezvous, and failure of any rank failing the whole attempt (docs/distributed.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
import redis

from shared import errors, keys
from shared.store import Store
from tests.shared.conftest import script_store
from tests.shared.test_lua import W, state
from tests.shared.test_lua_verification import W1, commit, complete

GIB = 1024


async def register(store: Store, node_id: str, slots: int = 1, address: str = "", gpu: bool = False,
                   labels: dict[str, str] | None = None) -> list[str]:
    """A node of 4 GiB per job (one GPU of that, with ``gpu``), named as its id."""
    gpu_mem = 4 * GIB if gpu else 0
    profile = orjson.dumps({"gpu": int(gpu), "gpu_mem": gpu_mem, "labels": labels or {}, "mem": 4 * GIB,
                            "ram": 8 * GIB}, option=orjson.OPT_SORT_KEYS).decode()
    return await store.run("REGISTER_NODE", [node_id, node_id, slots, "gpu" if gpu else "cpu", int(gpu), gpu_mem,
                                             8 * GIB, "{}", orjson.dumps(labels or {}).decode(), "hash", 60_000,
                                             0.1, *W, "", f"key-{node_id}", "stream-digest", 4 * GIB,
                                             4 * GIB * slots, profile, "gpu-x" if gpu else "cpu",
                                             address or f"10.0.0.{node_id[-1]}"])


async def submit(store: Store, job_id: str, nodes: int = 2, memory_mb: int = 1000, priority: str = "normal",
                 tenant: str = "t", gpu: bool = False, labels: dict[str, str] | None = None) -> list[str]:
    band = {"high": 0, "normal": 1, "low": 2}[priority]
    return await store.run("SUBMIT_JOB", [job_id, tenant, "", "job", priority, band, 3, "{}", int(gpu), 0, 0,
                                          orjson.dumps(labels or {}, option=orjson.OPT_SORT_KEYS).decode(),
                                          memory_mb, 3_600_000, 1000, nodes])


async def report(store: Store, job_id: str, node_id: str, attempt: int, status: str, fault: str = "node",
                 seq: int = 1, error: str = "boom") -> list[str]:
    return await store.run("REPORT_PROGRESS", [job_id, node_id, attempt, seq, status, '{"step": 1}',
                                               '{"seq": 1}', error if status == "failed" else "", fault])


async def rendezvous(store: Store, job_id: str, node_id: str, attempt: int, rank: int, port: int | None = None,
                     ready: bool = False) -> list[str]:
    return await store.run("RENDEZVOUS", [job_id, node_id, attempt, rank, port or "", "1" if ready else "", "", "1"])


def running(r: redis.Redis, *nodes: str) -> list[int]:
    return [int(r.hget(keys.node_key(n), "running") or -1) for n in nodes]


@pytest.fixture()
async def reserving(r: redis.Redis, redis_url: str) -> AsyncIterator[Store]:
    """A store whose waiting gangs reserve free nodes at once (CYXWIZ_GANG_RESERVE_S=0)."""
    s = script_store(redis_url, CYXWIZ_GANG_RESERVE_S="0")
    yield s
    await s.close()


async def test_a_gang_takes_distinct_nodes_all_at_once(store: Store, r: redis.Redis) -> None:
    await register(store, "n1", slots=2)
    assert (await submit(store, "g"))[2] == "queued"  # two slots, but one node: ranks need distinct nodes
    assert running(r, "n1") == [0] and r.zrange(keys.QUEUE_PARKED, 0, -1) == ["g"]  # no two live nodes fit
    await register(store, "n2")  # the second node: both are taken in one step
    job = r.hgetall(keys.job_key("g"))
    members = orjson.loads(job["nodes:1"])
    assert job["status"] == "assigned" and sorted(members) == ["n1", "n2"] and job["node_id"] == members[0]
    assert job["node:1"] == members[0] and running(r, "n1", "n2") == [1, 1]
    assert r.zcard(keys.QUEUE_GANGS) == 0
    for rank, node in enumerate(members):
        [(_, entry)] = r.xrange(keys.node_stream_key(node))
        assert entry["job_id"] == "g" and entry["rank"] == str(rank) and entry["world_size"] == "2"


async def test_two_gangs_needing_more_nodes_than_exist_never_hold_part_of_them(store: Store, r: redis.Redis) -> None:
    for node in ("n1", "n2", "n3"):
        await register(store, node)
    await submit(store, "g1")
    await submit(store, "g2")  # needs two more nodes: only one is free, and it holds nothing for it
    assert r.hget(keys.job_key("g1"), "status") == "assigned" and r.hget(keys.job_key("g2"), "status") == "queued"
    assert sorted(running(r, "n1", "n2", "n3")) == [0, 1, 1]
    await report(store, "g1", r.hget(keys.job_key("g1"), "node_id"), 1, "failed", fault="job")  # g1 ends
    assert r.hget(keys.job_key("g2"), "status") == "assigned" and sorted(running(r, "n1", "n2", "n3")) == [0, 1, 1]


async def test_only_rank_0_reports_progress_and_any_rank_fails_the_whole_attempt(store: Store,
                                                                               r: redis.Redis) -> None:
    for node in ("n1", "n2", "n3"):
        await register(store, node)
    await submit(store, "g")
    rank0, rank1 = orjson.loads(r.hget(keys.job_key("g"), "nodes:1"))
    assert await report(store, "g", rank0, 1, "running") == ["ok", "running"]
    with pytest.raises(errors.Forbidden, match="rank 0 does"):
        await report(store, "g", rank1, 1, "running", seq=2)
    spare = ({"n1", "n2", "n3"} - {rank0, rank1}).pop()
    with pytest.raises(errors.Forbidden):  # not a member
        await report(store, "g", spare, 1, "failed")
    await report(store, "g", rank1, 1, "failed", error="rank 1 crashed")  # its own fault
    job = r.hgetall(keys.job_key("g"))
    assert job["attempt"] == "2" and job["lost_count"] == "1"
    assert float(r.hget(keys.REPUTATION, rank1)) < 0.75 == float(r.hget(keys.REPUTATION, rank0))
    assert r.smembers(keys.node_cancels_key(rank0)) == {"g:1"}  # rank 0 stops attempt 1, not a later one
    assert job["status"] == "assigned" and rank1 not in orjson.loads(job["nodes:2"])  # another node first
    with pytest.raises(errors.Conflict):  # rank 0's report of the broken attempt
        await report(store, "g", rank0, 1, "failed", fault="peer", seq=3)


async def test_ranks_that_lost_their_peers_wait_for_the_one_at_fault(store: Store, r: redis.Redis) -> None:
    for node in ("n1", "n2"):
        await register(store, node)
    await submit(store, "g")
    rank0, rank1 = orjson.loads(r.hget(keys.job_key("g"), "nodes:1"))
    await report(store, "g", rank0, 1, "failed", fault="peer")
    job = r.hgetall(keys.job_key("g"))
    assert job["attempt"] == "1" and running(r, rank0, rank1) == [0, 1]  # its slot is free, nobody charged yet
    await report(store, "g", rank1, 1, "failed", fault="peer")  # every rank says so: no one to blame
    job = r.hgetall(keys.job_key("g"))
    assert job["attempt"] == "2" and job["ended:1"].startswith("every rank lost its peers")
    assert float(r.hget(keys.REPUTATION, rank0)) == float(r.hget(keys.REPUTATION, rank1)) == 0.75


async def test_a_reaped_member_requeues_the_gang_and_frees_the_others(store: Store, r: redis.Redis) -> None:
    for node in ("n1", "n2"):
        await register(store, node)
    await submit(store, "g")
    rank0, rank1 = orjson.loads(r.hget(keys.job_key("g"), "nodes:1"))
    r.zadd(keys.NODES_DEADLINE, {rank1: 1})  # its heartbeat lapsed long ago
    assert await store.run("REAP", []) == [rank1]
    job = r.hgetall(keys.job_key("g"))
    assert job["status"] == "queued" and job["attempt"] == "2" and job["lost_count"] == "1"
    assert running(r, rank0) == [0] and r.smembers(keys.node_cancels_key(rank0)) == {"g:1"}
    assert float(r.hget(keys.REPUTATION, rank1)) < 0.75 == float(r.hget(keys.REPUTATION, rank0))
    await register(store, "n3")  # a fresh pair: placed again, attempt 2
    assert r.hget(keys.job_key("g"), "status") == "assigned"


async def test_the_rendezvous_publishes_rank_0s_address_and_completes(store: Store, r: redis.Redis) -> None:
    for node in ("n1", "n2", "n3"):
        await register(store, node)
    await submit(store, "g")
    rank0, rank1 = orjson.loads(r.hget(keys.job_key("g"), "nodes:1"))
    spare = ({"n1", "n2", "n3"} - {rank0, rank1}).pop()
    assert (await rendezvous(store, "g", rank1, 1, 1))[1] == ""  # arrived; no master yet
    state = await rendezvous(store, "g", rank0, 1, 0, port=29500)
    assert state[1] == f"10.0.0.{rank0[-1]}:29500" and state[2] == 2 and state[3] == "[0,1]"
    with pytest.raises(errors.Forbidden):
        await rendezvous(store, "g", rank1, 1, 0)  # it is rank 1
    with pytest.raises(errors.Forbidden):
        await rendezvous(store, "g", spare, 1, 0)
    with pytest.raises(errors.InvalidField):
        await rendezvous(store, "g", rank1, 1, 1, port=1)  # only rank 0 publishes
    await rendezvous(store, "g", rank0, 1, 0, ready=True)
    assert not r.hexists(keys.job_rendezvous_key("g"), "complete")
    assert (await rendezvous(store, "g", rank1, 1, 1, ready=True))[4] == "[0,1]"
    assert r.hexists(keys.job_rendezvous_key("g"), "complete")
    with pytest.raises(errors.Forbidden):
        await rendezvous(store, "g", rank0, 2, 0)  # no attempt 2


async def test_a_rank_that_never_shows_up_fails_the_attempt_as_its_nodes_fault(store: Store, r: redis.Redis) -> None:
    for node in ("n1", "n2"):
        await register(store, node)
    await submit(store, "g")
    rank0, rank1 = orjson.loads(r.hget(keys.job_key("g"), "nodes:1"))
    await rendezvous(store, "g", rank0, 1, 0, port=29500)
    await store.run("HEARTBEAT", [rank0, ""])
    assert r.hget(keys.job_key("g"), "attempt") == "1"  # within the deadline
    r.hset(keys.job_rendezvous_key("g"), "started_ms", 1)  # placed long ago
    await store.run("HEARTBEAT", [rank0, ""])
    job = r.hgetall(keys.job_key("g"))
    assert job["attempt"] == "2" and job["ended:1"] == f"rank 1 (node {rank1}) did not join the rendezvous within 120 s"
    assert float(r.hget(keys.REPUTATION, rank1)) < 0.75 == float(r.hget(keys.REPUTATION, rank0))


async def test_a_waiting_gang_reserves_free_nodes_against_single_jobs(reserving: Store, store: Store,
                                                                      r: redis.Redis) -> None:
    await register(reserving, "n1")
    await register(reserving, "n2")
    await submit(reserving, "one", nodes=1)  # holds a node
    await submit(reserving, "g")  # waits: one node free
    await submit(reserving, "single", nodes=1)  # would fit the free node
    assert r.hget(keys.job_key("single"), "status") == "queued"  # no: the gang reserves it
    holder = r.hget(keys.job_key("one"), "node_id")
    await report(reserving, "one", holder, 1, "failed", fault="job")
    await reserving.run("HEARTBEAT", [holder, ""])
    assert r.hget(keys.job_key("g"), "status") == "assigned"  # both free at once: the gang first
    # without a reservation (60 s by default), a single job backfills the free node meanwhile
    r.flushdb()
    await register(store, "n1")
    await register(store, "n2")
    await submit(store, "one", nodes=1)
    await submit(store, "g")
    await submit(store, "single", nodes=1)
    assert r.hget(keys.job_key("single"), "status") == "assigned"


async def test_cancelling_a_gang_stops_every_rank(store: Store, r: redis.Redis) -> None:
    for node in ("n1", "n2"):
        await register(store, node)
    await submit(store, "g")
    rank0, rank1 = orjson.loads(r.hget(keys.job_key("g"), "nodes:1"))
    await store.run("CANCEL_JOB", ["g", ""])
    assert running(r, rank0, rank1) == [0, 0]
    assert "g" in r.smembers(keys.node_cancels_key(rank0)) and r.smembers(keys.node_cancels_key(rank1)) == {"g:1"}


async def test_a_rank_silent_after_a_peer_reported_losing_it_fails_the_attempt(store: Store, r: redis.Redis) -> None:
    for node in ("n1", "n2"):
        await register(store, node)
    await submit(store, "g")
    rank0, rank1 = orjson.loads(r.hget(keys.job_key("g"), "nodes:1"))
    await rendezvous(store, "g", rank0, 1, 0, port=29500, ready=True)
    await rendezvous(store, "g", rank1, 1, 1, ready=True)  # complete: the rendezvous deadline no longer applies
    await report(store, "g", rank0, 1, "failed", fault="peer")  # rank 1 stays alive and says nothing
    await store.run("HEARTBEAT", [rank1, ""])
    assert r.hget(keys.job_key("g"), "attempt") == "1"  # within the deadline
    r.hset(keys.job_rendezvous_key("g"), "peer_since", 1)  # rank 0 lost it long ago
    beat = await store.run("HEARTBEAT", [rank1, ""])
    job = r.hgetall(keys.job_key("g"))
    assert job["attempt"] == "2" and job["ended:1"] == (f"rank 1 (node {rank1}) did not end the attempt within "
                                                        "120 s of a rank reporting that it lost its peers")
    assert float(r.hget(keys.REPUTATION, rank1)) < 0.75 == float(r.hget(keys.REPUTATION, rank0))
    assert "g:1" in beat[4:]  # told to stop that attempt


async def test_a_rendezvous_timeout_tells_every_rank_to_stop(store: Store, r: redis.Redis) -> None:
    for node in ("n1", "n2"):
        await register(store, node)
    await submit(store, "g")
    rank0, rank1 = orjson.loads(r.hget(keys.job_key("g"), "nodes:1"))
    await rendezvous(store, "g", rank0, 1, 0, port=29500)
    r.hset(keys.job_rendezvous_key("g"), "started_ms", 1)  # rank 1 never came
    beat = await store.run("HEARTBEAT", [rank0, ""])
    assert r.hget(keys.job_key("g"), "attempt") == "2"
    assert "g:1" in beat[4:] and r.smembers(keys.node_cancels_key(rank1)) == {"g:1"}  # rank 0 too, not only rank 1


async def test_rank_0_that_never_publishes_its_store_is_the_one_charged(store: Store, r: redis.Redis) -> None:
    for node in ("n1", "n2"):
        await register(store, node)
    await submit(store, "g")
    rank0, rank1 = orjson.loads(r.hget(keys.job_key("g"), "nodes:1"))
    await rendezvous(store, "g", rank0, 1, 0)  # arrives, publishes nothing
    before = state(r)
    with pytest.raises(errors.Conflict, match="before it is ready"):
        await rendezvous(store, "g", rank0, 1, 0, ready=True)
    assert state(r) == before
    await rendezvous(store, "g", rank1, 1, 1)  # arrives, and can only wait for rank 0's store
    r.hset(keys.job_rendezvous_key("g"), "started_ms", 1)
    await store.run("HEARTBEAT", [rank1, ""])
    job = r.hgetall(keys.job_key("g"))
    assert job["attempt"] == "2" and job["ended:1"] == f"rank 0 (node {rank0}) did not join the rendezvous within 120 s"
    assert float(r.hget(keys.REPUTATION, rank0)) < 0.75 == float(r.hget(keys.REPUTATION, rank1))


async def test_rank_0s_store_is_published_once(store: Store, r: redis.Redis) -> None:
    for node in ("n1", "n2"):
        await register(store, node)
    await submit(store, "g")
    rank0 = r.hget(keys.job_key("g"), "node_id")
    first = await rendezvous(store, "g", rank0, 1, 0, port=29500)
    assert await rendezvous(store, "g", rank0, 1, 0, port=29500) == first  # a retry after a lost answer
    before = state(r)
    with pytest.raises(errors.Conflict, match="already"):  # the others may be connecting to the first
        await rendezvous(store, "g", rank0, 1, 0, port=29501)
    assert state(r) == before and first[1].endswith(":29500")


async def test_a_repeated_peer_report_counts_once(store: Store, r: redis.Redis) -> None:
    for node in ("n1", "n2"):
        await register(store, node)
    await submit(store, "g")
    rank1 = orjson.loads(r.hget(keys.job_key("g"), "nodes:1"))[1]
    for _ in range(2):  # a retry after a lost answer
        await report(store, "g", rank1, 1, "failed", fault="peer")
    rendezvous_state = r.hgetall(keys.job_rendezvous_key("g"))
    assert r.xlen(keys.job_progress_key("g")) == 1 and rendezvous_state["peer_since"] == rendezvous_state["peer:1"]


async def test_a_gangs_rendezvous_is_purged_with_it(store: Store, r: redis.Redis) -> None:
    for node in ("n1", "n2"):
        await register(store, node)
    await submit(store, "g")
    rank0 = r.hget(keys.job_key("g"), "node_id")
    await rendezvous(store, "g", rank0, 1, 0, port=29500)
    await store.run("CANCEL_JOB", ["g", ""])
    r.zadd(keys.JOBS_FINISHED, {"g": 1})  # it ended long ago
    await store.run("REAP", [])
    assert not r.exists(keys.job_key("g"), keys.job_rendezvous_key("g"))


async def test_a_gang_result_is_rechecked_if_its_rank_0_is_ever_slashed(redis_url: str, r: redis.Redis) -> None:
    audited = script_store(redis_url, CYXWIZ_PROBATION_AUDITS="2", CYXWIZ_AUDIT_FRACTION="0.1")
    try:
        for node in ("n1", "n2"):
            await register(audited, node)
        await submit(audited, "g")
        rank0 = r.hget(keys.job_key("g"), "node_id")
        await commit(audited, r, "g", rank0, 1, "weights", {"weights": W1})
        await complete(audited, "g", rank0, 1, 50)
        job = r.hgetall(keys.job_key("g"))
        assert job["status"] == "completed" and job["verify_status"] == "skipped"  # not replayed yet
        assert r.zscore(keys.node_results_key(rank0), "g") is not None  # but it rests on rank 0's work
    finally:
        await audited.close()
