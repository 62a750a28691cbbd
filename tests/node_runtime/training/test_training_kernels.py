"""Kernel selection: our Triton modules (run by Triton's CPU interpreter here) are interchangeable
with torch's, and a torch-only run never imports the kernels package."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import safetensors.torch
import torch

from node_runtime.training import build_model, load_trained_model, run_training
from node_runtime.training.datasets import load_dataset

Recorder = Any  # the conftest's Recorder, handed over by the ``recorder`` fixture
SpecFor = Callable[..., dict[str, Any]]
REPO = Path(__file__).resolve().parents[3]

MODELS = {
    "mlp": ({"type": "mlp", "hidden": [16, 8], "norm": "layernorm"}, "digits"),
    "sequential": ({"type": "sequential", "layers": [
        {"type": "linear", "out": 16}, {"type": "silu"}, {"type": "rmsnorm"}, {"type": "linear", "out": 8},
        {"type": "tanh"}, {"type": "linear", "out": 10}]}, "digits"),
    "transformer": ({"type": "transformer", "d_model": 16, "n_heads": 2, "n_layers": 1, "context": 8,
                     "norm": "rmsnorm"}, "tiny-text"),
}


@pytest.fixture()
def kernels(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The kernels package with Triton's interpreter on: without a GPU that is how its kernels run."""
    pytest.importorskip("triton", reason="Triton is not installed, so the Triton kernels cannot run here")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        import kernels as package
    except Exception as error:  # the package is there but broken: say so, do not skip
        pytest.fail(f"the kernels package cannot be imported: {type(error).__name__}: {error}")
    assert package.use_triton("cpu"), "the kernels would fall back to torch: nothing Triton would be tested"
    return package


@pytest.mark.parametrize("case", MODELS)
def test_kernel_modules_are_interchangeable_with_torch(kernels: ModuleType, spec_for: SpecFor, case: str) -> None:
    model, dataset = MODELS[case]
    spec = spec_for(model, dataset)
    data = load_dataset(spec)
    with_kernels, with_torch = build_model(spec, data.info, use_kernels=True), build_model(spec, data.info)
    assert any(isinstance(module, kernels.LinearAct) for module in with_kernels.modules())
    assert not any(isinstance(module, kernels.LinearAct) for module in with_torch.modules())
    kernel_state, torch_state = with_kernels.state_dict(), with_torch.state_dict()
    assert list(kernel_state) == list(torch_state)  # same names at the same paths: weights load either way
    assert all(torch.equal(kernel_state[name], tensor) for name, tensor in torch_state.items())  # same init
    inputs, _ = next(data.val_batches(4))
    with torch.no_grad():
        torch.testing.assert_close(with_kernels.eval()(inputs[:4]), with_torch.eval()(inputs[:4]),
                                   rtol=1e-4, atol=1e-4)


def test_training_with_triton_kernels_matches_torch(kernels: ModuleType, recorder: Callable[..., Recorder],
                                                    spec_for: SpecFor) -> None:
    model, dataset = MODELS["mlp"]
    results = {}
    for choice in ("triton", "torch"):
        spec = spec_for(model, dataset, kernels=choice, batch_size=32, progress_every_steps=1)
        results[choice] = run_training(spec, recorder(stop_after_steps=3).context())
        assert (results[choice].status, results[choice].step) == ("stopped", 3)
    triton_weights, torch_weights = (safetensors.torch.load(results[c].weights) for c in ("triton", "torch"))
    for name, tensor in torch_weights.items():
        torch.testing.assert_close(triton_weights[name], tensor, rtol=1e-3, atol=1e-4, msg=name)
    load_trained_model(results["triton"].weights)  # kernel-trained weights rebuild with plain torch modules


def test_torch_kernels_import_nothing_from_the_kernels_package() -> None:
    script = textwrap.dedent("""
        import sys
        from node_runtime.training import TrainingContext, run_training
        from shared.jobspec import parse_job_spec

        for kernels in ("torch", "auto"):  # auto means torch on a CPU device
            spec = parse_job_spec({"model": {"type": "mlp", "hidden": [8]}, "dataset": "digits",
                                   "training": {"epochs": 1, "kernels": kernels, "progress_every_steps": 1}})
            reports = []
            run_training(spec, TrainingContext(report=reports.append, should_stop=lambda: len(reports) >= 2,
                                               save_checkpoint=lambda data: None))
        print(sorted(name for name in sys.modules if name.split(".")[0] == "kernels"))
    """)
    # torch.optim itself imports the triton package when it is installed (torch._dynamo checks for it);
    # what matters is that our kernels package, and so any Triton launch, stays out of a torch run
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
