"""Every model type builds with the size the job spec predicts, trains a few steps and round-trips."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from node_runtime.training import build_model, load_trained_model, run_training
from node_runtime.training.datasets import load_dataset
from shared.model_shapes import check_model_fits

Recorder = Any  # the conftest's Recorder, handed over by the ``recorder`` fixture
SpecFor = Callable[..., dict[str, Any]]

CONV_STACK = [{"type": "conv2d", "out_channels": 8, "padding": 1}, {"type": "relu"}, {"type": "maxpool"},
              {"type": "conv2d", "out_channels": 8, "kernel_size": 1}, {"type": "silu"}, {"type": "avgpool"},
              {"type": "flatten"}, {"type": "linear", "out": 32}, {"type": "tanh"}, {"type": "layernorm"},
              {"type": "dropout", "p": 0.1}, {"type": "linear", "out": 10}]
CASES: dict[str, tuple[dict[str, Any], Any, dict[str, Any]]] = {
    "mlp-digits": ({"type": "mlp", "hidden": [64, 32], "norm": "layernorm", "dropout": 0.1}, "digits", {}),
    "mlp-blobs-rmsnorm-sgd": ({"type": "mlp", "hidden": [16], "activation": "tanh", "norm": "rmsnorm"},
                              {"name": "blobs", "n_features": 5, "n_classes": 4}, {"optimizer": "sgd"}),
    "mlp-spirals-adam": ({"type": "mlp", "hidden": [32, 32], "activation": "sigmoid"}, "spirals",
                         {"optimizer": "adam"}),
    "cnn-digits": ({"type": "cnn", "channels": [8, 16], "hidden": [32], "activation": "silu"}, "digits", {}),
    "transformer-text": ({"type": "transformer", "d_model": 32, "n_layers": 2, "n_heads": 4, "context": 32,
                          "norm": "rmsnorm", "activation": "silu", "dropout": 0.1}, "tiny-text", {}),
    "sequential-contract": ({"type": "sequential", "layers": [
        {"type": "linear", "out": 128}, {"type": "gelu"}, {"type": "dropout", "p": 0.1},
        {"type": "linear", "out": 10}]}, "digits", {}),
    "sequential-conv": ({"type": "sequential", "layers": CONV_STACK}, "digits", {"lr_schedule": "cosine"}),
    "sequential-bigram-text": ({"type": "sequential", "context": 32, "layers": [
        {"type": "embedding", "dim": 32}, {"type": "rmsnorm"}, {"type": "linear", "out": 256, "bias": False}]},
        "tiny-text", {}),
}


@pytest.mark.parametrize("case", CASES)
def test_model_trains_a_few_steps_and_round_trips(case: str, recorder: Callable[..., Recorder],
                                                  spec_for: SpecFor, tmp_path: Path) -> None:
    model, dataset, training = CASES[case]
    spec = spec_for(model, dataset, progress_every_steps=1, batch_size=16, **training)
    record = recorder(stop_after_steps=4)
    result = run_training(spec, record.context())

    assert (result.status, result.step) == ("stopped", 4)
    assert all(math.isfinite(report["metrics"]["loss"]) for report in record.reports)
    data = load_dataset(spec)
    torch_model = build_model(spec, data.info)
    # the size the control plane computed without torch is the size torch builds
    assert sum(p.numel() for p in torch_model.parameters()) == check_model_fits(spec["model"], data.info)

    # the contract: model.safetensors loads with safetensors.torch.load_file into the model the spec describes
    path = tmp_path / "model.safetensors"
    path.write_bytes(result.weights)
    torch_model.load_state_dict(safetensors.torch.load_file(str(path)))
    rebuilt = load_trained_model(path)
    inputs, _ = next(data.val_batches(8))
    torch_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(inputs[:8]), torch_model(inputs[:8]))
        assert load_trained_model(result.weights)(inputs[:2]).shape[0] == 2


def test_parameter_names_are_stable() -> None:
    from shared.jobspec import parse_job_spec

    spec = parse_job_spec({"model": {"type": "mlp", "hidden": [8], "norm": "layernorm"}, "dataset": "digits",
                           "training": {"epochs": 1}})
    model = build_model(spec, load_dataset(spec).info)
    assert list(model.state_dict()) == ["blocks.0.linear.weight", "blocks.0.linear.bias", "blocks.0.norm.weight",
                                        "blocks.0.norm.bias", "head.weight", "head.bias"]


def test_regression_uses_mse_and_reports_no_accuracy(recorder: Callable[..., Recorder], spec_for: SpecFor,
                                                     data_root: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(300, 3, generator=generator)
    targets = features @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    lines = ["a,b,c,target"] + [",".join(f"{v:.6f}" for v in [*row, t]) for row, t in zip(features.tolist(),
                                                                                           targets[:, 0].tolist(),
                                                                                           strict=True)]
    (data_root / "linear.csv").write_text("\n".join(lines))
    spec = spec_for({"type": "mlp", "hidden": [16]}, {"url": "linear.csv"}, epochs=30, learning_rate=1e-2)
    result = run_training(spec, recorder().context(data_root=data_root))
    assert "accuracy" not in result.metrics and "val_accuracy" not in result.metrics
    assert result.metrics["val_loss"] < 0.01  # MSE against targets of variance ~0.4
