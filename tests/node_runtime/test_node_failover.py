"""No job is lost: a draining node hands its job back with a checkpoint, a killed node's job is
requeued, a crashed job process is retried, a reaped node registers again, outages are ridden out."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from cyxwiz.embedded import EmbeddedValkey, free_port
from cyxwiz.server import stop_process, wait_healthy
from tests.conftest import DIGITS_SPEC, bearer
from tests.node_runtime.conftest import LongTtlCluster
from tests.node_runtime.node_harness import (
    Api,
    NodeProcess,
    install_credentials,
    long_digits,
    start_gateway_on,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)


def _attempt_events(api: Api, job_id: str, attempt: int) -> list[dict[str, object]]:
    return [e for e in api.events(job_id) if e["attempt"] == attempt]


def test_sigterm_hands_the_job_back_and_another_node_resumes_it_from_its_checkpoint(
        api: Api, start_node: Callable[..., NodeProcess]) -> None:
    first = start_node(name="first")
    [first_node] = api.wait_nodes(1)
    job_id = api.submit(long_digits(60))
    api.wait_progress(job_id, min_step=150, timeout_s=60)

    first.signal(signal.SIGTERM)
    assert first.wait(30) == 0
    job = api.job(job_id)
    assert job["status"] == "queued" and job["attempt"] == 2 and job["node_id"] is None
    handed_back = _attempt_events(api, job_id, 1)[-1]
    assert handed_back["status"] == "queued" and int(handed_back["step"]) >= 150  # type: ignore[call-overload]
    assert "checkpoint.safetensors" in job["artifacts"]
    assert all(n["node_id"] != first_node["node_id"] for n in api.nodes())  # deregistered

    second = start_node(name="second")
    job = api.wait_status(job_id, ("completed", "failed"), 90)
    assert job["status"] == "completed", job["error"]
    assert job["attempt"] == 2 and job["node_id"] != first_node["node_id"]
    resumed = [e for e in _attempt_events(api, job_id, 2) if int(e["step"]) > 0]  # type: ignore[call-overload]
    assert int(resumed[0]["step"]) >= int(handed_back["step"])  # type: ignore[call-overload]
    assert "resumes from a checkpoint" in second.log()
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 60 * 23
    assert job["progress"]["metrics"]["val_accuracy"] >= 0.95


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_whole_process_group_hands_the_job_back_at_its_exact_step(
        api: Api, start_node: Callable[..., NodeProcess], signum: int) -> None:
    """``systemctl stop`` (SIGTERM to every process of the unit) or Ctrl-C in a terminal (SIGINT to the
    group) reaches the job processes and the forkserver too: they ignore it and leave the drain to the
    runtime, so the job saves its exact position before it goes back, instead of dying and resuming
    from an older checkpoint."""
    first = start_node(name="first", own_group=True)
    api.wait_nodes(1)
    job_id = api.submit(long_digits(60))
    api.wait_progress(job_id, min_step=150, timeout_s=60)

    first.signal_group(signum)
    assert first.wait(30) == 0
    job = api.job(job_id)
    assert job["status"] == "queued" and job["attempt"] == 2 and job["node_id"] is None
    [handed_back] = [e for e in _attempt_events(api, job_id, 1) if e["status"] == "queued"]
    step = int(handed_back["step"])  # type: ignore[call-overload]
    assert step >= 150 and f"stopped at step {step} for the node's shutdown" in first.log()
    assert "killed" not in first.log()

    start_node(name="second")
    job = api.wait_status(job_id, ("completed", "failed"), 90)
    assert job["status"] == "completed" and job["attempt"] == 2, job["error"]
    # the next attempt started from a checkpoint of exactly the step handed back
    resumed = {e["metrics"]["resumed_from_step"] for e in api.events(job_id)
               if e["attempt"] == 2 and "resumed_from_step" in e["metrics"]}
    assert resumed == {step}


@pytest.mark.timeout(240)
def test_sigkill_loses_no_job(api: Api, start_node: Callable[..., NodeProcess]) -> None:
    doomed = start_node(name="doomed")
    [doomed_node] = api.wait_nodes(1)
    job_id = api.submit(long_digits(300))  # long enough to outlast the survivor's start on a quiet machine
    api.wait_progress(job_id, min_step=50, timeout_s=60)
    job_pids = doomed.job_process_pids()
    assert job_pids
    start_node(name="survivor")
    api.wait_nodes(2)

    doomed.signal(signal.SIGKILL)
    doomed.wait(10)
    # its job process notices and exits too, instead of training on for a node that is gone
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in job_pids), 10,
               what="the orphaned job process to exit")
    job = api.wait_status(job_id, ("completed", "failed"), 180)
    assert job["status"] == "completed", job["error"]
    assert job["attempt"] == 2 and job["node_id"] != doomed_node["node_id"]


def test_a_runtime_restarted_within_its_ttl_resumes_as_the_same_node(long_ttl_cluster: LongTtlCluster) -> None:
    api, start = long_ttl_cluster.api, long_ttl_cluster.start
    node = start("phoenix")
    [before] = api.wait_nodes(1)
    job_id = api.submit(long_digits(60))
    wait_until(lambda: any(e["metrics"].get("checkpoint_step") for e in api.events(job_id)), 60,
               what="a stored checkpoint")
    node.signal(signal.SIGKILL)  # a crash: no drain, no hand-back
    node.wait(10)
    again = start("phoenix")  # same name and data dir, well within the TTL
    job = api.wait_status(job_id, ("completed", "failed"), 90)
    assert job["status"] == "completed", job["error"]
    # the same node and the same attempt: nothing was requeued, the pending entry was re-read first
    assert job["attempt"] == 1 and job["node_id"] == before["node_id"]
    assert f"resumed as node {before['node_id']}" in again.log()
    runs = [e["metrics"]["resumed_from_step"] for e in api.events(job_id) if "resumed_from_step" in e["metrics"]]
    assert runs[0] == 0 and runs[-1] > 0  # the second run started from the first run's checkpoint
    assert len([e for e in api.events(job_id) if e["status"] == "completed"]) == 1


def test_a_second_runtime_with_the_same_name_is_refused(api: Api, start_node: Callable[..., NodeProcess]) -> None:
    first = start_node(name="twin")
    [node] = api.wait_nodes(1)
    second = start_node(name="twin")  # same name, same data dir: one name is one node identity
    assert second.wait(60) == 2
    assert "another node runtime named 'twin'" in second.log()
    assert first.alive() and [n["node_id"] for n in api.nodes()] == [node["node_id"]]


def test_a_crashed_job_process_is_a_node_fault_and_the_job_is_retried(
        api: Api, start_node: Callable[..., NodeProcess]) -> None:
    node = start_node()
    job_id = api.submit(long_digits(40))
    api.wait_progress(job_id, min_step=30, timeout_s=60)
    [pid] = node.job_process_pids()
    os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
    job = api.wait_status(job_id, ("completed", "failed"), 90)
    assert job["status"] == "completed", job["error"]
    assert job["attempt"] == 2
    [failed] = [e for e in api.events(job_id) if e["status"] == "failed"]
    assert failed["attempt"] == 1 and "SIGKILL" in str(failed["error"])
    assert node.alive()


def test_a_reaped_node_registers_again_and_finishes_the_requeued_job(
        api: Api, start_node: Callable[..., NodeProcess]) -> None:
    node = start_node()
    [before] = api.wait_nodes(1)
    job_id = api.submit(long_digits(90))
    api.wait_progress(job_id, min_step=30, timeout_s=60)
    node.signal(signal.SIGSTOP)  # the runtime freezes: no heartbeats for longer than the 2 s TTL
    # until the control plane reaped it, however slow the reaper is today
    wait_until(lambda: all(n["node_id"] != before["node_id"] for n in api.nodes()), 30,
               what="the frozen node to be reaped")
    node.signal(signal.SIGCONT)
    job = api.wait_status(job_id, ("completed", "failed"), 90)
    assert job["status"] == "completed", job["error"]
    assert job["attempt"] == 2 and job["node_id"] != before["node_id"]
    assert "registering again" in node.log()
    assert "stopped at step" in node.log()  # the old attempt's process stopped once its reports were refused
    assert [n["node_id"] for n in api.nodes()] == [job["node_id"]]


@pytest.mark.timeout(150)
def test_the_node_rides_out_api_and_redis_outages(tmp_path: Path, start_node: Callable[..., NodeProcess]) -> None:
    valkey = EmbeddedValkey(tmp_path / "store", persist=True)  # persisted: a restart keeps the jobs
    valkey.start()
    port = free_port()
    gateway = node = None
    api_url = f"http://127.0.0.1:{port}"
    try:
        admin_key, join_token = install_credentials(valkey.url)
        node = NodeProcess(api_url, join_token, tmp_path / "node.log",
                           extra_env={"CYXWIZ_NODE_RETRY_MAX_S": "1"}).start()
        wait_until(lambda: "cannot register" in node.log(), 20, what="the node to find no API")

        gateway = start_gateway_on(port, valkey.url)  # the API comes up after the node
        assert wait_healthy(api_url, 30)
        with httpx.Client(base_url=api_url, timeout=10) as http:
            api = Api(http, admin_key)
            api.wait_nodes(1)
            job_id = api.submit(long_digits(40))
            api.wait_progress(job_id, min_step=30, timeout_s=60)

            stop_process(gateway)  # the API goes away mid-training for a second
            time.sleep(1.0)
            gateway = start_gateway_on(port, valkey.url)
            assert wait_healthy(api_url, 30)

            valkey.kill()  # then the state store crashes and comes back
            time.sleep(1.0)
            valkey.start()

            job = api.wait_status(job_id, ("completed", "failed"), 90)
            assert job["status"] == "completed", job["error"] + node.log()
            next_job = api.wait_status(api.submit(DIGITS_SPEC), ("completed", "failed"), 60)
            assert next_job["status"] == "completed", node.log()
        assert node.alive()
        assert "reachable again" in node.log() or "answers again" in node.log()
        node.stop()
    finally:
        if node is not None:
            node.stop()
        if gateway is not None:
            stop_process(gateway)
        valkey.stop()


def test_a_runtime_restarted_while_its_node_was_draining_registers_afresh(
        long_ttl_cluster: LongTtlCluster, creds: dict[str, str], r: redis.Redis) -> None:
    """An admin drained the node (its job runs on), the runtime crashed and came back within the TTL:
    it registers afresh with its node key instead of resuming a node that is leaving, and the job it
    held is handed back (no attempt spent) and finished there."""
    api, start = long_ttl_cluster.api, long_ttl_cluster.start
    first = start("drained")
    [before] = api.wait_nodes(1)
    job_id = api.submit(long_digits(100))
    api.wait_progress(job_id, min_step=30, timeout_s=60)
    drained = long_ttl_cluster.http.delete(f"/v1/nodes/{before['node_id']}", headers=bearer(creds["api_key"]))
    assert drained.status_code == 202 and drained.json()["status"] == "draining"
    first.signal(signal.SIGKILL)
    first.wait(10)
    again = start("drained")
    [after] = wait_until(lambda: [n for n in api.nodes() if n["status"] == "online"], 60,
                         what="the runtime to register afresh")
    assert after["node_id"] != before["node_id"] and after["name"] == "drained"
    assert "was draining; registering afresh" in again.log()
    job = api.wait_status(job_id, ("completed", "failed"), 120)
    assert job["status"] == "completed" and job["node_id"] == after["node_id"], job["error"]
    assert job["attempt"] == 2 and r.hget(f"cyxwiz:job:{job_id}", "lost_count") == "0"  # handed back, not lost
    assert again.alive() and "left the cluster" not in again.log()
