"""Step checkpoints end to end: a crash (SIGKILL of the node runtime and its job process together, as
an OOM kill or a host losing power would) loses the work since the last checkpoint, which is taken at
the first step boundary after ``checkpoint.min_interval_s``, mid-epoch included, never a whole epoch."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.node_runtime.node_harness import Api, NodeProcess, wait_until

pytestmark = pytest.mark.timeout(300)
# a small transformer on tiny-shakespeare: an epoch is 1,960 steps of a few milliseconds each, so a
# whole epoch is many checkpoint intervals long
SPEC: dict[str, Any] = {
    "name": "shakespeare-steps",
    "model": {"type": "transformer", "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "context": 32},
    "dataset": {"name": "tiny-shakespeare"},
    "training": {"max_steps": 2500, "batch_size": 16, "learning_rate": 0.003, "progress_every_steps": 50,
                 "checkpoint": {"min_interval_s": 1.0}},
}
STEPS_PER_EPOCH = 1960


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (job processes, and a forkserver's children), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_a_crash_loses_at_most_one_checkpoint_interval(api: Api, start_node: Callable[..., NodeProcess]) -> None:
    doomed = start_node(name="doomed")
    api.wait_nodes(1)
    job_id = api.submit(SPEC)

    def mid_epoch_checkpoints() -> list[dict[str, Any]]:
        found = [c for c in api.job(job_id)["checkpoints"] if not c["final"] and c["step"] % STEPS_PER_EPOCH]
        return found if len(found) >= 2 else []

    stored = wait_until(mid_epoch_checkpoints, 180, interval_s=0.2, what="two mid-epoch checkpoints")
    last_stored = max(c["step"] for c in stored)
    processes = [doomed.pid, *descendants(doomed.pid)]
    for pid in processes:  # all at once: no process gets to save or hand anything back
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    doomed.wait(10)
    killed_at = max(int(e["step"]) for e in api.events(job_id))  # the last step the control plane heard of

    start_node(name="survivor")
    job = api.wait_status(job_id, ("completed", "failed"), 240)
    assert job["status"] == "completed", job["error"]
    assert job["attempt"] == 2 and job["progress"]["step"] == job["progress"]["total_steps"] == 2500
    # the second attempt started from the newest checkpoint there was: mid-epoch, never the epoch's start
    started_from = job["attempts"][1]["started_from"]
    resumed = next(c for c in job["checkpoints"] if c["state"] == started_from)
    assert resumed["step"] >= last_stored and resumed["step"] % STEPS_PER_EPOCH, (resumed, last_stored)
    runs = [e["metrics"]["resumed_from_step"] for e in api.events(job_id)
            if e["attempt"] == 2 and "resumed_from_step" in e["metrics"]]
    assert runs and runs[0] == resumed["step"]
    assert killed_at - resumed["step"] < STEPS_PER_EPOCH  # lost: less than an epoch (one interval, here)
