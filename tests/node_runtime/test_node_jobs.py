"""How a node runtime runs jobs: cancel, a job that fails, two slots at once."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import DIGITS_SPEC
from tests.node_runtime.node_harness import Api, NodeProcess, long_digits, wait_until

pytestmark = pytest.mark.timeout(120)


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_cancel_stops_the_job_at_once_and_frees_its_slot(api: Api, start_node: Callable[..., NodeProcess]) -> None:
    node = start_node()
    job_id = api.submit(long_digits())
    api.wait_progress(job_id, min_step=20, timeout_s=60)
    job_pids = node.job_process_pids()
    assert job_pids, "the job runs in a child process of the runtime"

    api.cancel(job_id)
    cancelled_at = time.monotonic()
    events_at_cancel = len(api.events(job_id))
    wait_until(lambda: "stopped at step" in node.log(), 10, what="the job process to stop")
    wait_until(lambda: not any(_pid_alive(pid) for pid in job_pids), 10, what="the job process to exit")
    stopped_after_s = time.monotonic() - cancelled_at
    match = re.search(r"stopped at step (\d+) \(cancel\)", node.log())
    assert match, node.log()
    assert int(match.group(1)) < 300 * 23  # long before the end
    assert len(api.events(job_id)) == events_at_cancel  # no progress after the cancel
    assert api.job(job_id)["status"] == "cancelled"
    assert stopped_after_s < 10

    # the slot is free again: the node's only slot takes the next job and finishes it
    next_job = api.submit(DIGITS_SPEC)
    finished = api.wait_status(next_job, ("completed", "failed"), 60)
    assert finished["status"] == "completed", finished["error"]
    assert node.alive()


def test_job_whose_data_cannot_load_fails_and_the_node_keeps_serving(
        api: Api, start_node: Callable[..., NodeProcess], tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    data_root.mkdir()
    (data_root / "broken.npz").write_bytes(b"this is not a zip archive")
    node = start_node(extra_args=["--data-root", str(data_root)])
    broken = {**DIGITS_SPEC, "name": "broken-data", "dataset": {"url": "broken.npz"}, "max_attempts": 3}
    job_id = api.submit(broken)
    job = api.wait_status(job_id, ("completed", "failed"), 60)
    assert job["status"] == "failed"
    assert "npz" in job["error"] and job["attempt"] == 1  # a job fault: final, not retried

    outside = {**DIGITS_SPEC, "name": "outside-root", "dataset": {"url": "/etc/passwd", "format": "csv"}}
    job = api.wait_status(api.submit(outside), ("completed", "failed"), 60)
    assert job["status"] == "failed" and "outside the node's data directory" in job["error"]

    good = api.wait_status(api.submit(DIGITS_SPEC), ("completed", "failed"), 60)
    assert good["status"] == "completed", good["error"]
    assert node.alive()


def test_two_slots_run_two_jobs_at_once(api: Api, start_node: Callable[..., NodeProcess]) -> None:
    node = start_node(slots=2)
    [registered] = api.wait_nodes(1)
    first, second = api.submit(long_digits(60, "first")), api.submit(long_digits(60, "second"))
    spans = []
    for job_id in (first, second):
        job = api.wait_status(job_id, ("completed", "failed"), 120)
        assert job["status"] == "completed", job["error"]
        assert job["node_id"] == registered["node_id"]
        events = api.events(job_id)
        trained = [e["time"] for e in events if e["status"] == "running" and e["step"] > 0]
        finished = [e["time"] for e in events if e["status"] == "completed"]
        spans.append((min(trained), max(finished)))
    # both trained at the same time: each took steps before the other completed (RFC 3339 UTC sorts)
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans
    assert "started in slot 0" in node.log() and "started in slot 1" in node.log()
    assert os.path.exists(node.log_path)


def test_an_admin_drain_lets_the_running_job_finish_then_the_node_leaves(
        api: Api, start_node: Callable[..., NodeProcess]) -> None:
    node = start_node()
    [registered] = api.wait_nodes(1)
    job_id = api.submit(long_digits(30))
    api.wait_progress(job_id, min_step=20, timeout_s=60)
    resp = api.http.delete(f"/v1/nodes/{registered['node_id']}", headers=api.headers)
    assert resp.status_code == 202 and resp.json()["status"] == "draining"
    waiting = api.submit(DIGITS_SPEC)  # a draining node takes no new work

    job = api.wait_status(job_id, ("completed", "failed"), 60)
    assert job["status"] == "completed" and job["attempt"] == 1, job["error"]
    assert node.wait(30) == 0  # it left on its own once idle
    assert api.nodes() == [] and api.job(waiting)["status"] == "queued"
    assert "leaving once running jobs end" in node.log()


def test_a_job_process_that_stops_taking_steps_is_killed_and_retried(
        api: Api, start_node: Callable[..., NodeProcess]) -> None:
    node = start_node(extra_env={"CYXWIZ_NODE_STALL_TIMEOUT_S": "3"})
    job_id = api.submit(long_digits(25))
    api.wait_progress(job_id, min_step=30, timeout_s=60)
    [pid] = node.job_process_pids()
    os.kill(pid, signal.SIGSTOP)  # hangs, as a deadlocked data loader would
    job = api.wait_status(job_id, ("completed", "failed"), 90)
    assert job["status"] == "completed" and job["attempt"] == 2, job["error"]
    [failed] = [e for e in api.events(job_id) if e["status"] == "failed"]
    assert "took no training step for 3 s" in str(failed["error"])
    assert not _pid_alive(pid)
