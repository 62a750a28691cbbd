"""Checkpoints and weights are plain safetensors with JSON metadata; bad ones are refused clearly."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import safetensors.torch
import torch

from node_runtime.training import JobError, load_trained_model, run_training
from node_runtime.training.checkpoints import read_metadata, spec_fingerprint

Recorder = Any  # the conftest's Recorder, handed over by the ``recorder`` fixture
SpecFor = Callable[..., dict[str, Any]]
MLP = {"type": "mlp", "hidden": [16]}


@pytest.fixture()
def checkpoint(recorder: Callable[..., Recorder], spec_for: SpecFor) -> bytes:
    record = recorder(stop_after_steps=5)
    run_training(spec_for(MLP, progress_every_steps=1), record.context())
    data: bytes = record.checkpoints[-1]
    return data


def test_checkpoint_is_safetensors_with_position_and_state(checkpoint: bytes) -> None:
    tensors = safetensors.torch.load(checkpoint)  # safetensors cannot hold code: nothing is unpickled
    metadata = read_metadata(checkpoint)
    assert metadata["format"] == "cyxwiz-checkpoint/1"
    assert json.loads(metadata["position"]) == {"epoch": 0, "batch": 5, "step": 5}
    assert {"model/head.weight", "optimizer/0/exp_avg", "optimizer/0/exp_avg_sq", "rng/cpu"} <= set(tensors)
    assert tensors["rng/cpu"].dtype == torch.uint8


@pytest.mark.parametrize(("mangle", "message"), [
    (lambda data: data[: len(data) // 2], "damaged"),
    (lambda data: b"\xff" * 64, "damaged"),
    (lambda data: b"", "damaged"),
])
def test_damaged_checkpoint_is_refused(checkpoint: bytes, recorder: Callable[..., Recorder], spec_for: SpecFor,
                                       mangle: Callable[[bytes], bytes], message: str) -> None:
    with pytest.raises(JobError, match=message):
        run_training(spec_for(MLP), recorder().context(initial_checkpoint=mangle(checkpoint)))


def test_checkpoint_of_another_job_is_refused(checkpoint: bytes, recorder: Callable[..., Recorder],
                                              spec_for: SpecFor) -> None:
    with pytest.raises(JobError, match="different model"):
        run_training(spec_for({"type": "mlp", "hidden": [17]}), recorder().context(initial_checkpoint=checkpoint))
    weights = run_training(spec_for(MLP), recorder().context()).weights
    with pytest.raises(JobError, match="not a CyxWiz training checkpoint"):
        run_training(spec_for(MLP), recorder().context(initial_checkpoint=weights))


def test_settings_that_do_not_change_the_maths_may_differ_on_resume(spec_for: SpecFor) -> None:
    base = spec_fingerprint(spec_for(MLP))
    assert base == spec_fingerprint(spec_for(MLP, epochs=5, kernels="torch", progress_every_steps=3))
    assert base != spec_fingerprint(spec_for(MLP, learning_rate=0.01))
    assert base != spec_fingerprint(spec_for(MLP, seed=3))


def test_weights_carry_what_rebuilds_the_model(recorder: Callable[..., Recorder], spec_for: SpecFor) -> None:
    spec = spec_for(MLP)
    result = run_training(spec, recorder().context())
    metadata = read_metadata(result.weights)
    assert json.loads(metadata["spec"]) == spec
    assert json.loads(metadata["data_info"])["num_classes"] == 10
    model = load_trained_model(result.weights)
    assert not model.training
    stored = safetensors.torch.load(result.weights)
    assert all(torch.equal(value, stored[name]) for name, value in model.state_dict().items())


def test_plain_safetensors_without_a_spec_is_refused() -> None:
    with pytest.raises(ValueError, match="not a CyxWiz model file"):
        load_trained_model(safetensors.torch.save({"weight": torch.zeros(2)}))


def test_a_replay_of_a_segment_is_bitwise_the_trainers(recorder: Callable[..., Recorder], spec_for: SpecFor) -> None:
    """What an audit relies on (docs/verification.md): from checkpoint k, training to k+1's step with
    the same thread count gives exactly k+1's weights and optimizer state, and from the seed to the end
    exactly the final weights; the digests are the gateway's, computed from the bytes."""
    from node_runtime.training.checkpoints import state_digests

    spec = spec_for({"type": "mlp", "hidden": [16], "dropout": 0.1}, epochs=3, checkpoint={"min_interval_s": 0})
    trainer = recorder()
    result = run_training(spec, trainer.context(cpu_threads=1))
    assert len(trainer.checkpoints) == 2  # after epochs 1 and 2 (the last epoch's state is the result)
    first, second = trainer.checkpoints
    step = json.loads(read_metadata(second)["position"])["step"]
    replay = run_training(spec, recorder().context(cpu_threads=1, initial_checkpoint=first, stop_at_step=step,
                                                    replay=True))
    assert replay.status == "segment" and replay.checkpoint is not None and replay.start_weights
    assert state_digests(replay.checkpoint) == state_digests(second)
    whole = run_training(spec, recorder().context(cpu_threads=1, replay=True))
    assert state_digests(whole.weights)["weights"] == state_digests(result.weights)["weights"]
    metadata = read_metadata(second)
    assert metadata["threads"] == "1" and metadata["device_kind"] == "cpu" and len(metadata["data"]) == 64
