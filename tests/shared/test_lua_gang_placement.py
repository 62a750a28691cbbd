"""Where and when gangs are placed, against the real server: one device class for all ranks, the reservation
against every other kind of work, the tenant's running limit counted per node, avoiding the nodes that
failed, and what a heartbeat costs while gangs wait (docs/distributed.md, docs/scheduling.md)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import orjson
import pytest
import redis

from shared import keys
from shared.store import Store
from tests.shared.conftest import script_store
from tests.shared.test_lua_gang import register, report, running, submit
from tests.shared.test_lua_verification import W1, commit, complete


@pytest.fixture()
async def reserving(r: redis.Redis, redis_url: str) -> AsyncIterator[Store]:
    """A store whose waiting gangs reserve free nodes at once (CYXWIZ_GANG_RESERVE_S=0)."""
    s = script_store(redis_url, CYXWIZ_GANG_RESERVE_S="0")
    yield s
    await s.close()


def members(r: redis.Redis, job_id: str, attempt: int = 1) -> list[str]:
    return orjson.loads(r.hget(keys.job_key(job_id), f"nodes:{attempt}") or "[]")  # type: ignore[no-any-return]


def status(r: redis.Redis, job_id: str) -> str:
    return r.hget(keys.job_key(job_id), "status")  # type: ignore[return-value]


async def test_a_cpu_gang_that_fits_only_across_device_classes_is_parked(reserving: Store, r: redis.Redis) -> None:
    await register(reserving, "c1")
    await register(reserving, "g2", gpu=True)
    await submit(reserving, "g")  # one CPU node and one GPU node could each hold a rank, never both together
    assert r.zscore(keys.QUEUE_PARKED, "g") is not None and r.zcard(keys.QUEUE_GANGS) == 0  # no_node_fits
    await submit(reserving, "single", nodes=1)  # a parked gang reserves nothing (gangs here reserve at once)
    assert status(r, "single") == "assigned"
    await register(reserving, "c3")  # a second CPU node: the gang could run, so it waits in the queue again
    assert r.zscore(keys.QUEUE_PARKED, "g") is None and status(r, "g") == "queued"
    await report(reserving, "single", r.hget(keys.job_key("single"), "node_id"), 1, "failed", fault="job")
    assert status(r, "g") == "assigned" and sorted(members(r, "g")) == ["c1", "c3"]


async def test_the_sweep_parks_a_gang_whose_class_lost_the_nodes_it_needs(store: Store, r: redis.Redis) -> None:
    for node in ("c1", "c2"):
        await register(store, node)
    await register(store, "g3", gpu=True)
    await submit(store, "one", nodes=1)
    await submit(store, "g")  # two CPU nodes could hold it: it waits for both to be free
    assert r.zscore(keys.QUEUE_GANGS, "g") is not None
    free = ({"c1", "c2"} - {r.hget(keys.job_key("one"), "node_id")}).pop()
    assert await store.run("DRAIN_NODE", [free]) == ["ok", "removed"]  # one CPU node and one GPU node are left
    await store.run("REAP", [])
    assert r.zscore(keys.QUEUE_PARKED, "g") is not None and r.zscore(keys.QUEUE_GANGS, "g") is None


async def test_a_reservation_holds_nodes_against_smaller_gangs_too(reserving: Store, r: redis.Redis) -> None:
    for node in ("n1", "n2", "n3"):
        await register(reserving, node)
    await submit(reserving, "one", nodes=1)
    await submit(reserving, "big", nodes=3)  # two nodes free: it waits, and reserves them
    await submit(reserving, "small", nodes=2)  # would fit the two free nodes
    assert status(r, "small") == "queued" and status(r, "big") == "queued"
    free = sorted({"n1", "n2", "n3"} - {r.hget(keys.job_key("one"), "node_id")})
    for node in free:  # their pulls keep them for the big gang
        await reserving.run("HEARTBEAT", [node, ""])
    assert status(r, "small") == "queued" and running(r, *free) == [0, 0]
    holder = r.hget(keys.job_key("one"), "node_id")
    await report(reserving, "one", holder, 1, "failed", fault="job")
    assert status(r, "big") == "assigned" and status(r, "small") == "queued"


async def test_a_gang_backfills_nodes_the_reserving_gang_cannot_use(reserving: Store, r: redis.Redis) -> None:
    r.hset(keys.REPUTATION, mapping={"b4": "0.4", "b5": "0.4"})  # scored below the zone-a nodes
    for node in ("a1", "a2", "a3"):
        await register(reserving, node, labels={"zone": "a"})
    for node in ("b4", "b5"):
        await register(reserving, node, labels={"zone": "b"})
    await submit(reserving, "one", nodes=1, labels={"zone": "a"})
    await submit(reserving, "big", nodes=3, labels={"zone": "a"})  # reserves the two free zone-a nodes
    await submit(reserving, "small", nodes=2)  # any zone: the best free nodes are zone a's, held for "big"
    assert status(r, "small") == "assigned" and sorted(members(r, "small")) == ["b4", "b5"]


async def test_verification_tasks_keep_off_a_reserved_node(redis_url: str, r: redis.Redis) -> None:
    store = script_store(redis_url, CYXWIZ_GANG_RESERVE_S="0", CYXWIZ_PROBATION_AUDITS="2",
                         CYXWIZ_AUDIT_FRACTION="0.1")
    try:
        await register(store, "t1")
        await submit(store, "j1", nodes=1)  # trained by t1, a new identity: its result will be audited
        await register(store, "v1")
        await submit(store, "g")  # waits for a second node, and reserves v1
        await commit(store, r, "j1", "t1", 1, "weights", {"weights": W1})
        await complete(store, "j1", "t1", 1, 50)  # t1 frees up; the audit's replay would go to v1
        assert status(r, "g") == "assigned" and sorted(members(r, "g")) == ["t1", "v1"]
        assert r.zcard(keys.VERIFY_QUEUE) == 1 and not r.smembers(keys.node_tasks_key("v1"))  # waits its turn
    finally:
        await store.close()


async def test_a_gang_holds_one_running_slot_per_node_toward_its_tenants_limit(store: Store, r: redis.Redis) -> None:
    for node in ("n1", "n2", "n3", "n4", "n5"):
        await register(store, node)
    r.hset(keys.tenant_key("t"), "max_running_jobs", 3)
    await submit(store, "g")
    await submit(store, "s1", nodes=1)
    await submit(store, "s2", nodes=1)  # three slots held by two jobs: the limit
    assert [status(r, j) for j in ("g", "s1", "s2")] == ["assigned", "assigned", "queued"]
    assert r.hget(keys.tenant_key("t"), "gang_extra_slots") == "1"
    await store.run("CANCEL_JOB", ["g", ""])  # its two slots free: s2 takes one
    await store.run("HEARTBEAT", [r.hget(keys.job_key("s1"), "node_id"), ""])
    assert status(r, "s2") == "assigned" and r.hget(keys.tenant_key("t"), "gang_extra_slots") == "0"
    await submit(store, "g2")  # two slots more would make four
    assert status(r, "g2") == "queued"
    await report(store, "s1", r.hget(keys.job_key("s1"), "node_id"), 1, "failed", fault="job")
    assert status(r, "g2") == "assigned" and r.hget(keys.tenant_key("t"), "gang_extra_slots") == "1"


async def test_a_gang_that_needs_every_node_runs_again_on_the_one_that_failed(store: Store, r: redis.Redis) -> None:
    for node in ("n1", "n2"):
        await register(store, node)
    await submit(store, "g")
    rank0, rank1 = members(r, "g")
    await report(store, "g", rank1, 1, "failed", fault="node")  # avoided, but no other node could stand in
    assert status(r, "g") == "assigned" and sorted(members(r, "g", 2)) == ["n1", "n2"]


async def test_every_rank_that_missed_the_rendezvous_is_avoided(store: Store, r: redis.Redis) -> None:
    r.hset(keys.REPUTATION, mapping={"n3": "0.35", "n4": "0.35"})  # scored below n1 and n2, even once charged
    for node in ("n1", "n2", "n3", "n4"):
        await register(store, node)
    await submit(store, "g")
    assert sorted(members(r, "g")) == ["n1", "n2"]
    r.hset(keys.job_rendezvous_key("g"), "started_ms", 1)  # placed long ago; nobody arrived
    await store.run("HEARTBEAT", ["n1", ""])
    assert r.hget(keys.job_key("g"), "attempt") == "2" and sorted(members(r, "g", 2)) == ["n3", "n4"]


async def commands_during(r: redis.Redis, call: Awaitable[Any]) -> list[str]:
    """The commands scripts ran on this database (db 1) while ``call`` ran: MONITOR shows each, marked lua.
    A marker sent afterwards on the same server ends the count, so nothing depends on timing."""
    marker, started, seen = "cyxwiz-count-ends", threading.Event(), []

    def watch() -> None:
        with r.monitor() as monitor:
            started.set()
            while True:
                command = monitor.next_command()
                if command["client_type"] != "lua" and marker in command["command"]:
                    return
                if command["client_type"] == "lua" and command["db"] == 1:
                    seen.append(command["command"])

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert started.wait(10)
    await call
    r.echo(marker)
    watcher.join(10)
    assert not watcher.is_alive()
    return seen


async def test_waiting_gangs_cost_a_heartbeat_little(store: Store, r: redis.Redis) -> None:
    """Four gangs wait for the two zone-b nodes, both busy; 84 zone-a nodes are free. A free node's heartbeat
    tried every gang on every free node (835 commands against 27 without gangs): now only gangs it could
    join, and a gang's class only when it has enough free nodes."""
    for index in range(2):
        await register(store, f"b{index}", labels={"zone": "b"})
    for index in range(84):
        await register(store, f"a{index}", labels={"zone": "a"})
    for index in range(2):
        await submit(store, f"busy{index}", nodes=1, labels={"zone": "b"})
    idle = len(await commands_during(r, store.run("HEARTBEAT", ["a0", ""])))
    for index in range(4):
        await submit(store, f"g{index}", labels={"zone": "b"})
    waiting = len(await commands_during(r, store.run("HEARTBEAT", ["a0", ""])))
    assert waiting - idle <= 40, (idle, waiting)
    assert all(status(r, f"g{index}") == "queued" for index in range(4))


async def test_a_one_node_jobs_heartbeat_does_not_look_for_a_rendezvous(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    await submit(store, "j1", nodes=1)
    seen = await commands_during(r, store.run("HEARTBEAT", ["n1", ""]))
    on_job = [c for c in seen if keys.job_key("j1") in c.split()]
    assert len(on_job) == 1 and "gang" in on_job[0], on_job  # one read, which says it is no gang
