"""Multi-node jobs end to end (docs/distributed.md): real node runtimes form a gang through the control
plane's rendezvous, train one model with torch.distributed (gloo) and hand back weights that load; a
member killed mid-job makes the gang requeue and finish from its checkpoint; two gangs that need more
nodes than exist do not deadlock; a member in its own network namespace trains over the veth link."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch

from load_tests.netns import host_pair, unavailable_reason
from node_runtime.training import load_trained_model
from node_runtime.training.datasets import load_dataset
from shared import keys
from shared.jobspec import parse_job_spec
from tests.node_runtime.node_harness import Api, NodeProcess, serve_on, wait_until
from tests.node_runtime.test_step_checkpoints import descendants

pytestmark = pytest.mark.timeout(300)


def gang_digits(epochs: int = 6, nodes: int = 2, **training: Any) -> dict[str, Any]:
    return {"name": "gang-digits", "model": {"type": "mlp", "hidden": [64], "norm": "layernorm"},
            "dataset": "digits", "requirements": {"nodes": nodes},
            "training": {"epochs": epochs, "batch_size": 64, "learning_rate": 0.003, "progress_every_steps": 10,
                         **training}}


def accuracy(weights: bytes, spec: dict[str, Any]) -> float:
    """The downloaded model's accuracy on the job's validation split, computed here."""
    model = load_trained_model(weights)
    data = load_dataset(parse_job_spec(spec))
    with torch.no_grad():
        return float((model(data.val_x).argmax(-1) == data.val_y).float().mean())


def test_a_two_node_digits_job_trains_one_model(api: Api, start_node: Callable[..., NodeProcess], api_url: str,
                                                creds: dict[str, str]) -> None:
    start_node(name="rank-a")
    start_node(name="rank-b")
    nodes = {n["node_id"] for n in api.wait_nodes(2)}
    spec = gang_digits()
    job = api.wait_status(api.submit(spec), ("completed", "failed"), 180)
    assert job["status"] == "completed", job["error"]
    assert set(job["attempts"][0]["node_ids"]) == nodes and job["attempts"][0]["node_ids"][0] == job["node_id"]
    assert job["attempt"] == 1 and job["progress"]["step"] == job["progress"]["total_steps"] == 6 * 23
    ranks = job["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["samples_per_s"] > 0 for r in ranks)
    assert job["progress"]["metrics"]["val_accuracy"] > 0.9
    assert accuracy(api.artifact(job["job_id"]), spec) == pytest.approx(job["progress"]["metrics"]["val_accuracy"],
                                                                        abs=1e-6)
    assert job["verification"]["status"] == "skipped" or job["verification"] is None
    status = subprocess.run([sys.executable, "-m", "cyxwiz.cli", "status", job["job_id"], "--api", api_url,
                             "--api-key", creds["api_key"]], capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if not k.startswith("CYXWIZ_")})
    assert status.returncode == 0, status.stderr
    assert f"rank 0 {job['node_ids'][0]}" in status.stdout and f"rank 1 {job['node_ids'][1]}" in status.stdout
    assert "samples/s" in status.stdout


def test_a_two_node_transformer_job_trains_and_samples(api: Api, start_node: Callable[..., NodeProcess]) -> None:
    start_node(name="lm-a")
    start_node(name="lm-b")
    api.wait_nodes(2)
    spec = {"name": "gang-lm", "model": {"type": "transformer", "d_model": 32, "n_layers": 1, "n_heads": 2,
                                         "d_ff": 64, "context": 32},
            "dataset": "tiny-text", "requirements": {"nodes": 2},
            "training": {"max_steps": 150, "batch_size": 32, "learning_rate": 0.003}}
    job = api.wait_status(api.submit(spec), ("completed", "failed"), 180)
    assert job["status"] == "completed", job["error"]
    assert job["progress"]["metrics"]["val_loss"] < 3.0  # uniform over 256 bytes is 5.5
    model = load_trained_model(api.artifact(job["job_id"]))
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 256)


def test_a_killed_member_requeues_the_gang_which_finishes_from_its_checkpoint(
        api: Api, start_node: Callable[..., NodeProcess], r: redis.Redis) -> None:
    keeper = start_node(name="keeper")
    doomed = start_node(name="doomed")
    api.wait_nodes(2)
    job_id = api.submit(gang_digits(epochs=400, checkpoint={"min_interval_s": 0.5}))
    wait_until(lambda: any(not c["final"] for c in api.job(job_id)["checkpoints"]), 120, what="a checkpoint")
    job = api.job(job_id)
    victim = next(n for n in api.nodes() if n["name"] == "doomed")
    assert victim["node_id"] in job["node_ids"]
    for pid in [doomed.pid, *descendants(doomed.pid)]:  # the member's host dies: runtime and job process
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    doomed.wait(10)
    start_node(name="fresh")
    job = api.wait_status(job_id, ("completed", "failed"), 240)
    assert job["status"] == "completed", job["error"]
    assert job["attempt"] >= 2 and victim["node_id"] not in job["node_ids"]
    assert "keeper" in {n["name"] for n in api.nodes()} and keeper.alive()
    resumed = [e["metrics"].get("resumed_from_step") for e in api.events(job_id) if e["attempt"] == job["attempt"]]
    assert any(step for step in resumed)  # the new gang started from the checkpoint, not from the seed
    assert job["progress"]["step"] == 400 * 23
    # the node at fault paid; the one whose peer vanished did not
    assert float(r.hget(keys.REPUTATION, "doomed") or 1) < 0.75
    assert float(r.hget(keys.REPUTATION, "keeper") or 0) >= 0.75


def test_a_cancel_stops_every_rank_and_frees_both_nodes(api: Api, start_node: Callable[..., NodeProcess]) -> None:
    members = [start_node(name="c-a"), start_node(name="c-b")]
    api.wait_nodes(2)
    job_id = api.submit(gang_digits(epochs=400))
    api.wait_progress(job_id, 30, 120)
    assert all(member.job_process_pids() for member in members)  # both ranks are training
    api.cancel(job_id)
    wait_until(lambda: not any(member.job_process_pids() for member in members), 60, what="both ranks to stop")
    assert api.job(job_id)["status"] == "cancelled"
    wait_until(lambda: all(n["running_jobs"] == 0 for n in api.nodes()), 30, what="both nodes to be free")
    assert all(member.alive() for member in members)
    # the freed nodes take the next gang at once
    job = api.wait_status(api.submit(gang_digits(epochs=1)), ("completed", "failed"), 120)
    assert job["status"] == "completed", job["error"]


def test_two_gangs_needing_more_nodes_than_exist_do_not_deadlock(api: Api,
                                                                 start_node: Callable[..., NodeProcess]) -> None:
    for name in ("g-a", "g-b", "g-c"):
        start_node(name=name)
    api.wait_nodes(3)
    first, second = api.submit(gang_digits(epochs=4)), api.submit(gang_digits(epochs=4))
    pending = api.job(second)
    if pending["status"] == "queued":
        assert pending["pending_reason"] == "gang"
    for job_id in (first, second):
        job = api.wait_status(job_id, ("completed", "failed"), 240)
        assert job["status"] == "completed", job["error"]
        assert len(set(job["node_ids"] or job["attempts"][-1]["node_ids"])) == 2


REASON = unavailable_reason()


@pytest.mark.slow
@pytest.mark.skipif(REASON is not None, reason=f"two-host test: {REASON}")
def test_a_gang_member_in_its_own_network_namespace_trains_over_the_link(tmp_path: Path) -> None:
    with host_pair("g") as pair, serve_on(pair.host_ip, tmp_path) as (api_url, creds):
        nodes: list[NodeProcess] = []
        try:
            nodes.append(NodeProcess(api_url, creds["join_token"], tmp_path / "local.log", name="local",
                                     extra_env={"CYXWIZ_DATA_DIR": str(tmp_path / "local")}).start())
            nodes.append(NodeProcess(api_url, creds["join_token"], tmp_path / "remote.log", name="remote",
                                     netns=pair.netns, extra_env={"CYXWIZ_DATA_DIR": str(tmp_path / "remote")}).start())
            with httpx.Client(base_url=api_url, timeout=10) as http:
                api = Api(http, creds["api_key"])
                registered = {n["name"]: n for n in api.wait_nodes(2, timeout_s=60)}
                assert registered["remote"]["address"] == pair.node_ip  # what the gateway saw, over the link
                assert registered["local"]["address"] == pair.host_ip
                job = api.wait_status(api.submit(gang_digits(epochs=3)), ("completed", "failed"), 180)
                logs = "".join(n.log() for n in nodes)
                assert job["status"] == "completed", f"{job['error']}\n{logs}"
                assert set(job["node_ids"] or job["attempts"][0]["node_ids"]) == {
                    registered["local"]["node_id"], registered["remote"]["node_id"]}
                assert job["progress"]["metrics"]["val_accuracy"] > 0.8
        finally:
            for node in nodes:
                node.stop()
