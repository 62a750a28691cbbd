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
    # a checkpoint at every step boundary (min_interval_s 0) but the last: the last state is the result
    assert len(trainer.checkpoints) == 3 * 23 - 1
    first, second = trainer.checkpoints[9], trainer.checkpoints[40]  # mid-epoch 1 to mid-epoch 2
    step = json.loads(read_metadata(second)["position"])["step"]
    replay = run_training(spec, recorder().context(cpu_threads=1, initial_checkpoint=first, stop_at_step=step,
                                                    replay=True))
    assert replay.status == "segment" and replay.checkpoint is not None and replay.start_weights
    assert state_digests(replay.checkpoint) == state_digests(second)
    whole = run_training(spec, recorder().context(cpu_threads=1, replay=True))
    assert state_digests(whole.weights)["weights"] == state_digests(result.weights)["weights"]
    metadata = read_metadata(second)
    assert metadata["threads"] == "1" and metadata["device_kind"] == "cpu" and len(metadata["data"]) == 64


def test_a_resume_is_bitwise_on_the_same_thread_count_and_close_on_another(
        recorder: Callable[..., Recorder], spec_for: SpecFor) -> None:
    """The resume rule (docs/node-runtime.md): the thread count changes float reduction order. Resumed with
    the checkpoint's thread count a run is bitwise the uninterrupted one; with another it is close."""
    model = {"type": "transformer", "d_model": 32, "n_layers": 1, "n_heads": 2, "context": 32, "dropout": 0.1}
    spec = spec_for(model, "tiny-text", max_steps=60, batch_size=16, progress_every_steps=1)
    whole = safetensors.torch.load(run_training(spec, recorder().context(cpu_threads=1)).weights)
    first = recorder(stop_after_steps=20)
    run_training(spec, first.context(cpu_threads=1))
    assert read_metadata(first.checkpoints[-1])["threads"] == "1"
    for threads in (1, 2):
        resumed = run_training(spec, recorder().context(cpu_threads=threads, initial_checkpoint=first.checkpoints[-1]))
        assert resumed.step == 60
        weights = safetensors.torch.load(resumed.weights)
        assert read_metadata(resumed.weights)["threads"] == str(threads)
        for name, tensor in whole.items():
            if threads == 1:
                assert torch.equal(weights[name], tensor), name
            else:  # measured: at most ~1e-5 absolute after 40 steps (docs/node-runtime.md states 1e-3)
                torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-3, msg=name)


def _weights_file(job: dict[str, Any], tensors: dict[str, torch.Tensor], **metadata: str) -> bytes:
    info = {"task": "classification", "num_features": 64, "image_shape": [1, 8, 8], "num_classes": 10,
            "target_dim": None, "vocab_size": None}
    return safetensors.torch.save(tensors, metadata={"format": "pt", "cyxwiz_format": "cyxwiz-weights/1",
                                                     "spec": json.dumps(job), "data_info": json.dumps(info),
                                                     **metadata})


@pytest.mark.parametrize(("tamper", "message"), [
    (lambda spec, tensors: b"PK\x03\x04 a zip file, not safetensors", "truncated|not valid JSON|not a CyxWiz"),
    (lambda spec, tensors: _weights_file({**spec, "model": {"type": "resnet"}}, tensors), "model.type"),
    (lambda spec, tensors: _weights_file({**spec, "model": {**spec["model"], "hidden": [-5]}}, tensors),
     "model.hidden.0"),
    (lambda spec, tensors: _weights_file(spec, tensors, spec="{not json"), "metadata is damaged"),
    (lambda spec, tensors: _weights_file(spec, tensors, data_info='{"task": "lm"}'), "data_info"),
    (lambda spec, tensors: _weights_file(spec, {**tensors, "head.weight": torch.full((10, 16), float("nan"))}),
     "NaN or infinite"),
    (lambda spec, tensors: _weights_file(spec, {**tensors, "head.weight": torch.zeros(3, 3)}), "shape"),
    (lambda spec, tensors: _weights_file(spec, {k: v for k, v in tensors.items() if k != "head.bias"}),
     "missing 'head.bias'"),
    (lambda spec, tensors: _weights_file(spec, {**tensors, "extra": torch.zeros(1)}), "unexpected 'extra'"),
    (lambda spec, tensors: _weights_file(spec, {**tensors, "head.bias": tensors["head.bias"].double()}), "float32"),
])
def test_a_malformed_model_file_raises_one_clear_value_error(
        recorder: Callable[..., Recorder], spec_for: SpecFor,
        tamper: Callable[[dict[str, Any], dict[str, torch.Tensor]], bytes], message: str, tmp_path: Any) -> None:
    spec = spec_for(MLP)
    good = run_training(spec, recorder().context()).weights
    bad = tamper(spec, safetensors.torch.load(good))
    with pytest.raises(ValueError, match=message):
        load_trained_model(bad)
    path = tmp_path / "model.safetensors"  # a path takes the same checks
    path.write_bytes(bad)
    with pytest.raises(ValueError, match=message):
        load_trained_model(path)
