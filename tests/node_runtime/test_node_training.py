"""Real training through the whole stack: a job submitted over HTTP is placed on a real node runtime
process, trained with PyTorch in a job process, and its weights come back through the API."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from node_runtime.training import load_trained_model
from tests.conftest import DIGITS_SPEC
from tests.node_runtime.node_harness import Api, NodeProcess

pytestmark = pytest.mark.timeout(120)


def test_registration_reports_the_hosts_real_capabilities(api: Api, start_node: Callable[..., NodeProcess]) -> None:
    start_node(slots=2, extra_args=["--label", "zone=test"])
    [node] = api.wait_nodes(1)
    caps = node["capabilities"]
    assert caps["device"] == "cpu" and caps["gpus"] == []  # this host has no CUDA device
    assert caps["cpu_cores"] == len(os.sched_getaffinity(0))
    assert caps["ram_mb"] == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    assert caps["torch_version"] == torch.__version__
    assert node["slots"] == 2 and node["labels"] == {"zone": "test"}


def test_digits_mlp_reaches_95_percent_and_its_weights_load(api: Api,
                                                            start_node: Callable[..., NodeProcess]) -> None:
    start_node()
    job_id = api.submit(DIGITS_SPEC)
    job = api.wait_status(job_id, ("completed", "failed"), 90)
    assert job["status"] == "completed", job["error"]
    assert job["progress"]["metrics"]["val_accuracy"] >= 0.95
    assert job["artifacts"] == ["model.safetensors"]

    events = api.events(job_id)
    running = [e for e in events if e["status"] == "running" and "loss" in e["metrics"]]
    assert len(running) >= 5 and running[-1]["epoch"] == 10  # about one report per epoch end
    assert [e["epoch"] for e in running] == sorted(e["epoch"] for e in running)
    losses = [e["metrics"]["loss"] for e in running]
    half = len(losses) // 2
    assert losses[-1] < losses[0] / 5 and sum(losses[:half]) / half > sum(losses[half:]) / (len(losses) - half)
    assert events[-1]["status"] == "completed" and events[-1]["step"] == events[-1]["total_steps"]
    assert [e["seq"] for e in events] == sorted({e["seq"] for e in events})

    model = load_trained_model(api.artifact(job_id))
    digits_like = torch.rand(5, 64) * 16
    assert model(digits_like).shape == (5, 10)


def test_tiny_transformer_learns_tiny_text(api: Api, start_node: Callable[..., NodeProcess]) -> None:
    start_node()
    spec = {"name": "tiny-lm",
            "model": {"type": "transformer", "d_model": 32, "n_layers": 1, "n_heads": 2, "context": 32},
            "dataset": {"name": "tiny-text"},
            "training": {"epochs": 1, "batch_size": 32, "learning_rate": 0.003, "seed": 0}}
    job_id = api.submit(spec)
    job = api.wait_status(job_id, ("completed", "failed"), 90)
    assert job["status"] == "completed", job["error"]
    metrics = job["progress"]["metrics"]
    uniform = math.log(256)  # a model that learned nothing: every byte equally likely
    assert metrics["val_loss"] < 0.6 * uniform, metrics
    model = load_trained_model(api.artifact(job_id))
    assert model(torch.zeros(1, 32, dtype=torch.long)).shape == (1, 32, 256)


def test_a_wrong_join_token_stops_the_runtime_with_exit_2(api_url: str, redis_url: str, tmp_path: Path) -> None:
    node = NodeProcess(api_url, "cwj_not-a-real-token", tmp_path / "node.log").start()
    assert node.wait(30) == 2
    assert "refused to register this node: 401" in node.log()
