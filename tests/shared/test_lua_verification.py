"""The verification scripts against the real server: provenance, the audit draw, verification tasks,
verdicts, slashing and probation (docs/verification.md). The end-to-end attacks with real node
runtimes are in tests/node_runtime/test_verification.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
import redis

from shared import errors, keys
from shared.store import Store
from tests.shared.conftest import script_store
from tests.shared.test_lua import register, submit

W1, W2, BAD = "1" * 64, "2" * 64, "f" * 64


@pytest.fixture()
async def store(r: redis.Redis, redis_url: str) -> AsyncIterator[Store]:
    s = script_store(redis_url, CYXWIZ_PROBATION_AUDITS="2", CYXWIZ_AUDIT_FRACTION="0.1")
    yield s
    await s.close()


async def commit(store: Store, r: redis.Redis, job: str, node: str, attempt: int, kind: str,
                 state: dict[str, object]) -> list[object]:
    """COMMIT_ARTIFACT of a model or checkpoint whose header the gateway read as ``state``."""
    name = "model.safetensors" if kind == "weights" else "checkpoint.safetensors"
    stored = name if kind == "weights" else keys.checkpoint_artifact_name(attempt, state["step"])
    upload = f"cyxwiz:job:{job}:upload:{name}:u{attempt}"
    r.hset(upload, mapping={"size": 1, "0": "x"})
    await store.run("CHECK_UPLOAD", [job, node, attempt, name, f"u{attempt}", 1, 10_000, 32, 60_000])
    return await store.run("COMMIT_ARTIFACT", [job, node, attempt, name, 1, 10_000, f"u{attempt}", kind,
                                               orjson.dumps(state).decode(), 0.5],
                           keys=[upload, keys.artifact_key(job, stored)])


async def complete(store: Store, job: str, node: str, attempt: int, step: int, seq: int = 10,
                   draw: float = 0.99) -> list[object]:
    progress = orjson.dumps({"epoch": 1, "step": step, "total_steps": step, "metrics": {}}).decode()
    return await store.run("REPORT_PROGRESS", [job, node, attempt, seq, "completed", progress, "{}", "", "job", "",
                                               "", draw, 0.5])


async def verdict(store: Store, task: str, node: str, weights: str, attempt: int = 1) -> list[object]:
    """A verifier's digest; when it differs and the trainer's bytes are kept, its distance to them (far)."""
    reply = await store.run("VERIFY_RESULT", [task, node, attempt, "digest", weights, "", "", "", "", "", ""])
    if reply[0] == "compare":
        reply = await store.run("VERIFY_RESULT", [task, node, attempt, "distance", "", "", "", "0.5", "", "", ""])
    return reply


async def audited(store: Store, r: redis.Redis) -> tuple[str, str]:
    """Job j1 trained by t1 (its weights W1) and completed, with v1 and v2 to replay it: (the node that
    got the verification task, the other one)."""
    await register(store, "t1")
    await submit(store, "j1")
    await register(store, "v1")
    await register(store, "v2")
    await commit(store, r, "j1", "t1", 1, "weights", {"weights": W1})
    await complete(store, "j1", "t1", 1, 50)
    first = "v1" if r.smembers(keys.node_tasks_key("v1")) else "v2"
    return first, "v2" if first == "v1" else "v1"


def task_on(r: redis.Redis, node: str) -> str:
    tasks = r.smembers(keys.node_tasks_key(node))
    assert len(tasks) == 1, tasks
    return tasks.pop()


async def test_a_probation_result_is_held_until_another_node_replays_it(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    await register(store, "n2")
    await submit(store, "j1")
    trainer = r.hget(keys.job_key("j1"), "node_id")
    verifier = "n2" if trainer == "n1" else "n1"
    with pytest.raises(errors.Conflict, match="upload model.safetensors"):
        await complete(store, "j1", trainer, 1, 50)
    await commit(store, r, "j1", trainer, 1, "weights", {"weights": W1, "threads": 1})
    assert await complete(store, "j1", trainer, 1, 50) == ["ok", "running"]  # held: its trainer is on probation
    job = r.hgetall(keys.job_key("j1"))
    assert job["held"] == "1" and job["verify_status"] == "pending" and job["verify_segment"] == "[0,1]"
    task = task_on(r, verifier)
    entry = r.xrange(keys.node_stream_key(verifier))[-1][1]
    assert entry["task_id"] == task and orjson.loads(entry["segment"])["to_final"] is True
    assert "weights" not in entry["segment"]  # the verifier is not told what to find
    with pytest.raises(errors.Forbidden):
        await verdict(store, task, trainer, W1)
    reply = await verdict(store, task, verifier, W1)
    assert reply[:3] == ["ok", "passed", trainer]
    job = r.hgetall(keys.job_key("j1"))
    assert job["status"] == "completed" and job["verify_status"] == "passed" and job["verify_verifier"] == verifier
    assert r.hget(keys.NODES_AUDITS, f"{trainer}:passed") == "1"
    assert not r.smembers(keys.node_tasks_key(verifier))
    with pytest.raises(errors.Conflict):  # answered once
        await verdict(store, task, verifier, W1)


async def test_a_mismatch_goes_to_a_third_node_and_the_liar_is_slashed(store: Store, r: redis.Redis) -> None:
    await register(store, "liar", slots=1)
    await submit(store, "j1")
    await register(store, "v1")
    await register(store, "v2")
    await commit(store, r, "j1", "liar", 1, "weights", {"weights": BAD})
    await complete(store, "j1", "liar", 1, 50)
    first = "v1" if r.smembers(keys.node_tasks_key("v1")) else "v2"
    second = "v2" if first == "v1" else "v1"
    assert (await verdict(store, task_on(r, first), first, W1))[:2] == ["ok", "second_opinion"]
    job = r.hgetall(keys.job_key("j1"))
    assert job["verify_round"] == "2" and job["status"] == "running"
    reply = await verdict(store, task_on(r, second), second, W1)
    assert reply[1] == "failed"
    job = r.hgetall(keys.job_key("j1"))
    assert job["verify_status"] == "failed" and "liar lied" in job["verify_note"]
    assert job["status"] in ("queued", "assigned") and job["attempt"] == "2" and job["node_id"] != "liar"
    assert r.hget(keys.REPUTATION, "liar") == "0" and r.hexists(keys.NODES_BANNED, "liar")
    assert not r.exists(keys.node_key("liar"))  # removed at once
    with pytest.raises(errors.Forbidden, match="slashed"):
        await register(store, "liar2", name="liar", node_key_hash="key-liar")


async def test_a_verifier_that_lies_is_slashed_and_the_result_stands(store: Store, r: redis.Redis) -> None:
    first, second = await audited(store, r)
    await verdict(store, task_on(r, first), first, BAD)
    reply = await verdict(store, task_on(r, second), second, W1)
    assert reply[1] == "passed"
    assert r.hget(keys.job_key("j1"), "status") == "completed"
    assert r.hexists(keys.NODES_BANNED, first) and not r.hexists(keys.NODES_BANNED, "t1")


async def test_a_hand_off_from_a_poisoned_checkpoint_audits_the_segment_that_made_it(
        store: Store, r: redis.Redis) -> None:
    await register(store, "bad")
    await submit(store, "j1")
    state = {"step": 1000, "epoch": 20, "batch": 0, "weights": BAD, "optimizer": BAD, "threads": 1}
    await commit(store, r, "j1", "bad", 1, "checkpoint", state)
    await store.run("REPORT_PROGRESS", ["j1", "bad", 1, 5, "queued", "", "{}", "", "job"])  # hands it back
    await register(store, "h1")
    await register(store, "h2")
    job = r.hgetall(keys.job_key("j1"))
    honest = job["node_id"]
    assert job["start:2"] == "a1s1000"  # resumes from the checkpoint the control plane recorded
    await commit(store, r, "j1", honest, 2, "weights", {"weights": BAD})
    await complete(store, "j1", honest, 2, 1000)  # zero steps of its own
    job = r.hgetall(keys.job_key("j1"))
    assert job["verify_status"] == "pending" and job["verify_steps"] == "[0,1000]"  # the poisoned segment
    task = r.hgetall(keys.verify_key(job["verify_task"]))
    assert task["producer"] == "bad" and task["node_id"] != ""
    first = task["node_id"]
    await verdict(store, job["verify_task"], first, W1)
    second = r.hget(keys.verify_key(r.hget(keys.job_key("j1"), "verify_task")), "node_id")
    assert second not in ("", first)
    await verdict(store, r.hget(keys.job_key("j1"), "verify_task"), second, W1)
    job = r.hgetall(keys.job_key("j1"))
    assert r.hexists(keys.NODES_BANNED, "bad") and job["attempt"] == "3"
    assert job["start:3"] == ""  # the poisoned checkpoint is never resumed from again: from the seed


async def test_commitments_and_positions_bind_checkpoints(store: Store, r: redis.Redis) -> None:
    await register(store, "n1")
    await submit(store, "j1")
    commitment = orjson.dumps({"step": 10, "weights": W1, "optimizer": W2, "data": ""}).decode()
    await store.run("REPORT_PROGRESS", ["j1", "n1", 1, 1, "running", '{"step": 10}', "{}", "", "job", "",
                                        commitment, 0.5, 0.5])
    with pytest.raises(errors.InvalidField, match="does not match the digests"):
        await commit(store, r, "j1", "n1", 1, "checkpoint", {"step": 10, "weights": BAD, "optimizer": W2})
    await commit(store, r, "j1", "n1", 1, "checkpoint", {"step": 10, "weights": W1, "optimizer": W2})
    with pytest.raises(errors.InvalidField, match="behind"):
        await commit(store, r, "j1", "n1", 1, "checkpoint", {"step": 5, "weights": W1, "optimizer": W2})
    states = r.hgetall(keys.job_states_key("j1"))
    assert orjson.loads(states["a1s10"])["node"] == "n1" and orjson.loads(states["a1s10"])["prev"] == ""


async def test_probation_means_one_job_at_a_time_and_no_credit_for_claims(store: Store, r: redis.Redis) -> None:
    await register(store, "new", slots=4)
    for i in range(3):
        await submit(store, f"j{i}")
    assert int(r.hget(keys.node_key("new"), "running")) == 1
    assert r.hget(keys.node_key("new"), "capability_used") == "0"
    await store.run("OBSERVE", ["new", 0.6, ""])
    assert float(r.hget(keys.node_key("new"), "capability_used")) == pytest.approx(0.6)
    await store.run("OBSERVE", ["new", 0.2, "slower than claimed"])
    assert float(r.hget(keys.NODES_OBSERVED, "new")) == pytest.approx(0.4)
    assert r.hget(keys.NODES_FLAGS, "new") == "slower than claimed"


async def test_with_no_other_node_of_its_kind_the_audit_is_skipped(store: Store, r: redis.Redis) -> None:
    await register(store, "only")
    await submit(store, "j1")
    await commit(store, r, "j1", "only", 1, "weights", {"weights": W1})
    assert await complete(store, "j1", "only", 1, 50) == ["ok", "completed"]
    job = r.hgetall(keys.job_key("j1"))
    assert job["verify_status"] == "skipped" and "no other live node" in job["verify_note"]
    assert r.zscore(keys.node_results_key("only"), "j1") is not None  # re-checked if "only" ever lies


async def test_a_verifier_lost_or_failing_gives_the_task_to_another(store: Store, r: redis.Redis) -> None:
    first, second = await audited(store, r)
    task = task_on(r, first)
    await store.run("VERIFY_RESULT", [task, first, 1, "failed", "", "", "", "", "crashed", "", ""])
    assert task_on(r, second) == task and r.hget(keys.verify_key(task), "attempt") == "2"
    await store.run("DRAIN_NODE", [second])  # draining: still holds the task until it reports
    await store.run("VERIFY_RESULT", [task, second, 2, "handback", "", "", "", "", "", "", ""])
    assert r.hget(keys.verify_key(task), "status") == "queued"  # first is excluded, second is leaving


async def test_observed_speed_sets_capability_and_flags_doubtful_claims(store: Store, r: redis.Redis) -> None:
    from shared.jobs import observe_speed
    from shared.jobspec import parse_job_spec
    from tests.conftest import DIGITS_SPEC

    await register(store, "fast")
    await register(store, "slow")
    spec = parse_job_spec(DIGITS_SPEC)
    r.hset(keys.job_key("jx"), mapping={"spec": orjson.dumps(spec).decode(),
                                        "progress": orjson.dumps({"metrics": {"samples_per_s": 50_000.0}}).decode()})
    # 100 steps of 64 samples in 1 s: the control plane saw 6400 samples/s, so the claimed 50,000 is capped;
    # a replay as slow or 5x faster proves nothing on so short a segment (start-up decides it)
    await observe_speed(store, "fast", "jx", 100, "0", "1000", "200")
    fast = float(r.hget(keys.NODES_OBSERVED, "fast"))
    assert 0.1 < fast < 0.6 and not r.hexists(keys.NODES_FLAGS, "fast")
    assert float(r.hget(keys.node_key("fast"), "capability_used")) == pytest.approx(fast)
    # 1000 steps taking 100 s that another node of the kind it claims replays in 10 s: flagged, halved
    await observe_speed(store, "slow", "jx", 1000, "0", "100000", "10000")
    assert "its claimed hardware is doubted" in r.hget(keys.NODES_FLAGS, "slow")
    assert float(r.hget(keys.NODES_OBSERVED, "slow")) < fast / 2


async def test_a_verifier_that_goes_quiet_loses_the_task_at_its_deadline(store: Store, r: redis.Redis) -> None:
    first, _ = await audited(store, r)
    task = task_on(r, first)
    await store.run("HEARTBEAT", [first, ""])
    assert task_on(r, first) == task  # within its deadline: kept
    r.hset(keys.verify_key(task), "deadline_ms", 1)
    await store.run("HEARTBEAT", [first, ""])
    assert not r.smembers(keys.node_tasks_key(first))
    assert task_on(r, "v2" if first == "v1" else "v1") == task
    assert float(r.hget(keys.REPUTATION, first)) < 0.75


async def test_a_task_nobody_may_take_any_more_ends_and_releases_the_result(store: Store, r: redis.Redis) -> None:
    await register(store, "t1")
    await submit(store, "j1")
    await register(store, "v1")
    await commit(store, r, "j1", "t1", 1, "weights", {"weights": W1})
    await complete(store, "j1", "t1", 1, 50)
    task = task_on(r, "v1")
    await store.run("DRAIN_NODE", ["v1"])  # the only other node leaves, handing the task back
    await store.run("VERIFY_RESULT", [task, "v1", 1, "handback", "", "", "", "", "", "", ""])
    assert r.hget(keys.job_key("j1"), "status") == "running"  # held: nobody left to replay it
    await store.run("REAP", [])
    job = r.hgetall(keys.job_key("j1"))
    assert job["status"] == "completed" and job["verify_status"] == "skipped"
    assert "no other live node" in job["verify_note"]
    assert r.zscore(keys.VERIFY_QUEUE, task) is None


async def test_a_cancelled_jobs_audit_ends_instead_of_costing_a_replay(store: Store, r: redis.Redis) -> None:
    await register(store, "t1", slots=2)
    await submit(store, "j1")
    await submit(store, "j2")  # t1 is on probation: j2 waits, so t1 stays busy
    await commit(store, r, "j1", "t1", 1, "weights", {"weights": W1})
    await register(store, "v1")
    await store.run("REPORT_PROGRESS", ["j2", "v1", 1, 1, "running", "{}", "{}", "", "job"])  # v1 is busy
    await complete(store, "j1", "t1", 1, 50)
    task = r.hget(keys.job_key("j1"), "verify_task")
    assert r.zscore(keys.VERIFY_QUEUE, task) is not None  # queued: no free verifier
    await store.run("CANCEL_JOB", ["j1", ""])
    await store.run("CANCEL_JOB", ["j2", ""])  # v1 frees up and pulls work
    await store.run("HEARTBEAT", ["v1", ""])
    assert r.hget(keys.verify_key(task), "outcome") == "obsolete" and not r.smembers(keys.node_tasks_key("v1"))
