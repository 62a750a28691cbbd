"""APPEND_LOGS against the real server: a node's log lines land in the attempt's capped stream, fenced
like progress reports, and still land for the attempt that held a job last once it ended."""

from __future__ import annotations

import pytest
import redis

from shared import errors, keys
from shared.store import Store
from tests.shared.test_lua import register, state, submit

T = "2026-01-31T12:00:00.000Z"


async def append(store: Store, job: str, node: str, attempt: int, *lines: str, token_hash: str = "") -> list[object]:
    args: list[object] = [job, node, attempt, token_hash]
    for line in lines:
        args += [T, line]
    return await store.run("APPEND_LOGS", args)


def logged(r: redis.Redis, job: str, attempt: int) -> list[str]:
    return [fields["line"] for _, fields in r.xrange(keys.job_logs_key(job, attempt))]


async def report(store: Store, job: str, node: str, attempt: int, seq: int, status: str, fault: str = "job",
                 error: str = "") -> list[object]:
    return await store.run("REPORT_PROGRESS", [job, node, attempt, seq, status, "{}", "{}", error, fault])


async def test_lines_are_appended_in_order_and_twice_is_safe(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    await submit(store, "j1")
    before = {k: v for k, v in state(r).items() if "logs" not in k}
    for _ in range(2):  # a retried batch (the answer was lost) lands again: harmless, and nothing else moves
        assert await append(store, "j1", "n1", 1, "first", "second") == ["ok", 2]
    assert logged(r, "j1", 1) == ["first", "second", "first", "second"]
    assert r.xrange(keys.job_logs_key("j1", 1))[0][1] == {"time": T, "line": "first"}
    assert {k: v for k, v in state(r).items() if "logs" not in k} == before
    assert await append(store, "j1", "n1", 1) == ["ok", 0]  # an empty batch: fenced, nothing added


async def test_the_stream_is_capped(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    await submit(store, "j1")
    for batch in range(keys.LOG_MAXLEN // 500 + 4):
        await append(store, "j1", "n1", 1, *(f"line {batch}-{i}" for i in range(500)))
    kept = logged(r, "j1", 1)
    assert keys.LOG_MAXLEN <= len(kept) < keys.LOG_MAXLEN + 500  # MAXLEN ~ trims whole macro nodes
    assert kept[-1] == f"line {keys.LOG_MAXLEN // 500 + 3}-499"  # the newest are kept


async def test_only_the_node_holding_the_attempt_appends(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    await register(store, "n2")
    await submit(store, "j1")
    holder = r.hget(keys.job_key("j1"), "node_id")
    other = "n2" if holder == "n1" else "n1"
    before = state(r)
    for _ in range(2):
        with pytest.raises(errors.Forbidden):
            await append(store, "j1", other, 1, "not mine")
        with pytest.raises(errors.Forbidden):
            await append(store, "j1", holder, 2, "an attempt nobody holds")
        with pytest.raises(errors.NotFound):
            await append(store, "j-none", holder, 1, "no job")
        with pytest.raises(errors.Unauthorized):
            await append(store, "j1", holder, 1, "bad token", token_hash="wrong")
    assert state(r) == before
    r.hset(keys.node_key(holder), "token_hash", "digest")
    assert await append(store, "j1", holder, 1, "with its token", token_hash="digest") == ["ok", 1]


async def test_a_stale_attempt_and_a_cancelled_job_are_refused(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    await register(store, "n2")
    await submit(store, "j1")
    first = r.hget(keys.job_key("j1"), "node_id")
    await report(store, "j1", first, 1, 1, "queued")  # handed back: attempt 2 goes to the other node
    second = r.hget(keys.job_key("j1"), "node_id")
    assert second not in ("", first) and r.hget(keys.job_key("j1"), "attempt") == "2"
    for _ in range(2):
        with pytest.raises(errors.Conflict) as refused:
            await append(store, "j1", first, 1, "too late")
        assert refused.value.code == "stale_attempt"
    assert await append(store, "j1", second, 2, "mine now") == ["ok", 1]
    await store.run("CANCEL_JOB", ["j1", ""])
    for _ in range(2):
        with pytest.raises(errors.Conflict) as refused:
            await append(store, "j1", second, 2, "after the cancel")
        assert refused.value.code == "job_cancelled"
    assert logged(r, "j1", 1) == [] and logged(r, "j1", 2) == ["mine now"]


async def test_lines_still_land_for_the_attempt_that_ended_the_job(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    await submit(store, "j1")
    await report(store, "j1", "n1", 1, 1, "failed", error="the loss became nan")  # the job's fault: final
    assert r.hget(keys.job_key("j1"), "status") == "failed"
    assert await append(store, "j1", "n1", 1, "Traceback (most recent call last):") == ["ok", 1]

    # the node's fault on the last allowed attempt: the job fails and its attempt moves on to one no node
    # ever held, and the lines of the attempt that held it last still land
    await submit(store, "j2")
    r.hset(keys.job_key("j2"), "max_attempts", 1)
    await report(store, "j2", "n1", 1, 1, "failed", fault="node", error="CUDA error: an illegal memory access")
    assert r.hmget(keys.job_key("j2"), "status", "attempt") == ["failed", "2"]
    for _ in range(2):
        assert await append(store, "j2", "n1", 1, "RuntimeError: CUDA error") == ["ok", 1]
    with pytest.raises(errors.Forbidden):
        await append(store, "j2", "n1", 2, "an attempt it never held")

    # a node's fault with attempts left: the job is queued again, and the old attempt is stale
    await submit(store, "j3")
    await report(store, "j3", "n1", 1, 1, "failed", fault="node", error="killed")
    assert r.hget(keys.job_key("j3"), "status") != "failed" and r.hget(keys.job_key("j3"), "attempt") == "2"
    with pytest.raises(errors.Conflict) as refused:
        await append(store, "j3", "n1", 1, "too late")
    assert refused.value.code == "stale_attempt"
