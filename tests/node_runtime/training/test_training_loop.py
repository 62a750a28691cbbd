"""The training loop end to end on the CPU: accuracy, determinism, progress, stop and resume."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

from node_runtime.training import JobError, TrainingResult, run_training
from node_runtime.training.checkpoints import read_metadata
from shared.jobspec import parse_job_spec

API_EXAMPLE = {
    "name": "digits-mlp",
    "model": {"type": "mlp", "hidden": [128, 64], "activation": "gelu", "norm": "layernorm", "dropout": 0.0},
    "dataset": {"name": "digits", "val_fraction": 0.2},
    "training": {"epochs": 10, "batch_size": 64, "optimizer": "adamw", "learning_rate": 0.001,
                 "weight_decay": 0.01, "seed": 0},
}
SMALL_MLP = {"type": "mlp", "hidden": [32], "dropout": 0.1}  # dropout: the RNG state must survive a resume


def weights(result: TrainingResult) -> dict[str, torch.Tensor]:
    return safetensors.torch.load(result.weights)


Recorder = Any  # the conftest's Recorder, handed over by the ``recorder`` fixture
SpecFor = Callable[..., dict[str, Any]]


@pytest.fixture(scope="module")
def digits_run(recorder: Callable[..., Recorder]) -> tuple[TrainingResult, Recorder, float]:
    record = recorder()
    started = time.monotonic()
    result = run_training(parse_job_spec(API_EXAMPLE), record.context())
    return result, record, time.monotonic() - started


def test_contract_digits_mlp_reaches_95_percent_quickly(digits_run: tuple[TrainingResult, Recorder, float]) -> None:
    result, recorder, seconds = digits_run
    assert result.status == "completed"
    assert (result.epoch, result.step, result.total_steps) == (10, 230, 230)
    assert result.metrics["val_accuracy"] >= 0.95
    losses = [report["metrics"]["loss"] for report in recorder.reports]
    assert losses[-1] < losses[0] / 10
    assert sum(later < earlier for earlier, later in itertools.pairwise(losses)) >= 8  # falling, epoch after epoch
    assert seconds < 30, f"10 epochs of the digits MLP took {seconds:.1f} s"  # ~3 s on an idle 2-core machine


def test_reports_follow_the_contract_shape(digits_run: tuple[TrainingResult, Recorder, float]) -> None:
    result, recorder, _ = digits_run
    assert [report["epoch"] for report in recorder.reports] == list(range(1, 11))  # one per epoch end
    for report in recorder.reports:
        assert set(report) == {"epoch", "step", "total_steps", "metrics"}
        metrics = report["metrics"]
        assert {"loss", "accuracy", "val_loss", "val_accuracy", "samples_per_s", "gpu_memory_mb"} <= set(metrics)
        assert metrics["gpu_memory_mb"] == 0 and metrics["samples_per_s"] > 0
        assert all(isinstance(value, (int, float)) and math.isfinite(value) for value in metrics.values())
    assert recorder.reports[-1]["metrics"]["val_accuracy"] == result.metrics["val_accuracy"]
    assert recorder.checkpoints == []  # the run took less than the default min_interval_s


def test_progress_every_n_steps(recorder: Callable[..., Recorder], spec_for: SpecFor) -> None:
    record = recorder()
    run_training(spec_for(SMALL_MLP, progress_every_steps=5), record.context())
    # 1438 training digits in batches of 64: 23 steps; reports after 5, 10, 15, 20 and at the epoch end
    assert [report["step"] for report in record.reports] == [5, 10, 15, 20, 23]
    assert "val_loss" not in record.reports[0]["metrics"] and "val_loss" in record.reports[-1]["metrics"]


def test_same_spec_gives_the_same_weights(recorder: Callable[..., Recorder], spec_for: SpecFor) -> None:
    spec = spec_for(SMALL_MLP, epochs=2)
    first, second = (run_training(spec, recorder().context()) for _ in range(2))
    expected = weights(first)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in weights(second).items())
    other_seed = run_training(spec_for(SMALL_MLP, epochs=2, seed=1), recorder().context())
    assert not torch.equal(weights(other_seed)["head.weight"], expected["head.weight"])


def test_checkpoints_at_step_boundaries_are_rate_limited(recorder: Callable[..., Recorder],
                                                         spec_for: SpecFor) -> None:
    every_step, rate_limited = recorder(), recorder()
    run_training(spec_for(SMALL_MLP, epochs=3, checkpoint={"min_interval_s": 0}), every_step.context())
    run_training(spec_for(SMALL_MLP, epochs=3, checkpoint={"min_interval_s": 3600}), rate_limited.context())
    # due at every step boundary, mid-epoch ones included, each written once and in order; not after the
    # last step (the final state is the result)
    positions = [json.loads(read_metadata(data)["position"]) for data in every_step.checkpoints]
    assert [p["step"] for p in positions] == list(range(1, 3 * 23))
    assert positions[22] == {"epoch": 1, "batch": 0, "step": 23}  # an epoch end, saved after its validation
    assert positions[30] == {"epoch": 1, "batch": 8, "step": 31}
    assert rate_limited.checkpoints == []


def test_stop_takes_effect_before_the_next_step(recorder: Callable[..., Recorder], spec_for: SpecFor) -> None:
    record = recorder(stop_after_steps=7)
    result = run_training(spec_for(SMALL_MLP, epochs=5, progress_every_steps=1), record.context())
    assert result.status == "stopped"
    assert (result.epoch, result.step, result.total_steps) == (0, 7, 115)
    assert len(record.checkpoints) == 1  # the stop keeps the exact position
    assert weights(result)  # the partial model still comes back


@pytest.mark.parametrize(("optimizer", "stop"), [("adamw", {"stop_after_checkpoints": 2}),
                                                 ("sgd", {"stop_after_steps": 30}),
                                                 ("adam", {"stop_after_steps": 23})])
def test_interrupted_then_resumed_run_matches_an_uninterrupted_one(
        recorder: Callable[..., Recorder], spec_for: SpecFor, optimizer: str, stop: dict[str, Any]) -> None:
    spec = spec_for(SMALL_MLP, epochs=4, optimizer=optimizer, progress_every_steps=1, lr_schedule="cosine",
                     warmup_steps=10, checkpoint={"min_interval_s": 0})
    uninterrupted = run_training(spec, recorder().context())

    first_attempt = recorder(**stop)
    stopped = run_training(spec, first_attempt.context())
    assert stopped.status == "stopped" and 0 < stopped.step < uninterrupted.step
    resumed = run_training(spec, recorder().context(initial_checkpoint=first_attempt.checkpoints[-1]))

    assert resumed.status == "completed"
    assert (resumed.epoch, resumed.step) == (uninterrupted.epoch, uninterrupted.step)
    expected, actual = weights(uninterrupted), weights(resumed)
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert resumed.metrics["val_loss"] == pytest.approx(uninterrupted.metrics["val_loss"], rel=1e-4)


def test_transformer_learns_tiny_text(recorder: Callable[..., Recorder], spec_for: SpecFor) -> None:
    model = {"type": "transformer", "d_model": 64, "n_layers": 2, "n_heads": 4, "context": 64}
    record = recorder()
    result = run_training(spec_for(model, "tiny-text", epochs=2, batch_size=32, learning_rate=3e-3),
                          record.context())
    uniform = math.log(256)  # the loss of guessing uniformly over the byte vocabulary
    assert result.metrics["val_loss"] < uniform - 2.5, result.metrics
    assert result.metrics["val_accuracy"] > 0.2
    assert result.metrics["tokens_per_s"] > 0


def test_raw_specs_are_normalized_and_invalid_ones_are_job_errors(recorder: Callable[..., Recorder]) -> None:
    raw = {"model": {"type": "mlp", "hidden": [8]}, "dataset": "digits", "training": {"epochs": 1}}
    assert run_training(raw, recorder().context()).status == "completed"
    with pytest.raises(JobError, match="model.hiden"):
        run_training({**raw, "model": {"type": "mlp", "hiden": [8]}}, recorder().context())


def test_max_steps_sets_the_length_and_ends_mid_epoch(recorder: Callable[..., Recorder], spec_for: SpecFor) -> None:
    record = recorder()
    spec = spec_for(SMALL_MLP, epochs=None, max_steps=30, lr_schedule="cosine", progress_every_steps=10)
    assert spec["training"]["epochs"] is None
    result = run_training(spec, record.context())
    assert result.status == "completed" and (result.step, result.total_steps, result.epoch) == (30, 30, 1)
    assert [r["step"] for r in record.reports] == [10, 20, 23, 30] and record.reports[-1]["total_steps"] == 30
    assert record.reports[-1]["epoch"] == 2  # 23 steps per epoch: the 30th is in the second
    assert "val_loss" in result.metrics  # validated where it ended
    # both bounds: whichever ends first
    assert run_training(spec_for(SMALL_MLP, epochs=1, max_steps=1000), recorder().context()).step == 23
    assert run_training(spec_for(SMALL_MLP, epochs=5, max_steps=40), recorder().context()).step == 40


def test_a_step_budget_resumed_mid_epoch_matches_an_uninterrupted_run(recorder: Callable[..., Recorder],
                                                                     spec_for: SpecFor) -> None:
    spec = spec_for(SMALL_MLP, epochs=None, max_steps=50, lr_schedule="cosine", progress_every_steps=1,
                    checkpoint={"min_interval_s": 0})
    whole = run_training(spec, recorder().context())
    first = recorder(stop_after_steps=31)
    assert run_training(spec, first.context()).status == "stopped"
    checkpoint = first.checkpoints[-1]
    assert json.loads(read_metadata(checkpoint)["position"])["batch"] > 0  # mid-epoch
    resumed = run_training(spec, recorder().context(initial_checkpoint=checkpoint))
    assert resumed.step == 50
    assert all(torch.equal(tensor, weights(whole)[name]) for name, tensor in weights(resumed).items())


def test_the_test_split_is_evaluated_once_at_the_end(recorder: Callable[..., Recorder], spec_for: SpecFor) -> None:
    record = recorder()
    spec = spec_for(SMALL_MLP, {"name": "digits", "test_fraction": 0.1}, epochs=2, progress_every_steps=5)
    result = run_training(spec, record.context())
    assert 0 < result.metrics["test_loss"] < 5 and 0 < result.metrics["test_accuracy"] <= 1
    assert all("test_loss" not in report["metrics"] for report in record.reports)  # only at the end
    plain = run_training(spec_for(SMALL_MLP, epochs=2), recorder().context())
    assert "test_loss" not in plain.metrics


def test_reading_the_loss_back_only_at_boundaries_gives_the_same_run(
        recorder: Callable[..., Recorder], spec_for: SpecFor, monkeypatch: pytest.MonkeyPatch,
        data_root: Path) -> None:
    """What a GPU does (no host sync per step), exercised on the CPU: the same weights and the same
    metrics as reading every step, and a NaN loss still fails the job, naming the steps it lies in."""
    from node_runtime.training import loop

    spec = spec_for(SMALL_MLP, epochs=2, progress_every_steps=7)
    every_step_record, deferred_record = recorder(), recorder()
    every_step = run_training(spec, every_step_record.context())
    monkeypatch.setattr(loop, "reads_every_step", lambda device: False)
    deferred = run_training(spec, deferred_record.context())
    assert all(torch.equal(tensor, weights(every_step)[name]) for name, tensor in weights(deferred).items())
    for before, after in zip(every_step_record.reports, deferred_record.reports, strict=True):
        assert before["step"] == after["step"]
        for name in ("loss", "accuracy", "val_loss", "val_accuracy"):
            expected = before["metrics"].get(name)
            assert after["metrics"].get(name) == (expected if expected is None else pytest.approx(expected, rel=1e-12))
    huge = io.BytesIO()  # regression targets of 1e30: the squared error overflows at the first step
    np.savez(huge, x=np.ones((512, 2), dtype=np.float32), y=np.full(512, 1e30, dtype=np.float32))
    (data_root / "huge.npz").write_bytes(huge.getvalue())
    with pytest.raises(JobError, match="loss became inf between steps 1 and 7"):
        run_training(spec_for(SMALL_MLP, {"url": "huge.npz"}, batch_size=16, progress_every_steps=7),
                     recorder().context(data_root=data_root))


def test_a_checkpoint_is_taken_at_the_first_step_boundary_after_the_interval(
        recorder: Callable[..., Recorder], spec_for: SpecFor, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a clock that advances one second per step and min_interval_s 2.5, checkpoints fall after
    steps 3, 6, 9, ...: the first boundary past each interval, so a crash loses at most interval + step."""
    from node_runtime.training import loop

    clock = [0.0]
    monkeypatch.setattr(loop, "time", type("Clock", (), {"monotonic": staticmethod(lambda: clock[0]),
                                                         "perf_counter": staticmethod(time.perf_counter)}))
    record = recorder()
    real_stop = record.should_stop

    def one_second_per_step() -> bool:
        clock[0] += 1.0
        return bool(real_stop())

    record.should_stop = one_second_per_step
    run_training(spec_for(SMALL_MLP, epochs=None, max_steps=20, checkpoint={"min_interval_s": 2.5}),
                 record.context())
    steps = [json.loads(read_metadata(data)["position"])["step"] for data in record.checkpoints]
    assert steps == [3, 6, 9, 12, 15, 18]  # not after step 20: the final state is the result


class _StopAtCheck:
    """A ``should_stop`` that fires from its ``n``-th call on: training steps and held-out batches each ask."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


@pytest.mark.parametrize("where", ["the first epoch's validation", "the last epoch's validation",
                                   "the test evaluation"])
def test_a_stop_in_a_validation_or_the_test_evaluation_resumes_to_the_same_end(
        recorder: Callable[..., Recorder], spec_for: SpecFor, where: str) -> None:
    spec = spec_for(SMALL_MLP, {"name": "digits", "test_fraction": 0.1}, epochs=2)
    whole_record = recorder()
    whole = run_training(spec, whole_record.context())
    per_epoch = whole.total_steps // 2
    # one stop check per step, then one per held-out batch: the first check after an epoch's last step is
    # in its validation; the last check of all is in the test evaluation
    checks = {"the first epoch's validation": per_epoch + 1, "the last epoch's validation": 2 * per_epoch + 2,
              "the test evaluation": whole_record.stop_checks}[where]
    first = recorder()
    stopped = run_training(spec, dataclasses.replace(first.context(), should_stop=_StopAtCheck(checks)))
    assert stopped.status == "stopped"
    resumed_record = recorder()
    resumed = run_training(spec, resumed_record.context(initial_checkpoint=first.checkpoints[-1]))
    assert resumed.status == "completed" and (resumed.epoch, resumed.step) == (whole.epoch, whole.step)
    for name in ("loss", "accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy"):
        assert resumed.metrics[name] == pytest.approx(whole.metrics[name], rel=1e-12), name
    # every epoch's validation was reported once, over the two attempts, with the uninterrupted run's numbers
    reported = [(r["epoch"], r["metrics"]["val_loss"]) for r in first.reports + resumed_record.reports]
    assert reported == [(r["epoch"], pytest.approx(r["metrics"]["val_loss"], rel=1e-12)) for r in whole_record.reports]
    assert all(torch.equal(tensor, weights(whole)[name]) for name, tensor in weights(resumed).items())


def test_a_checkpoint_that_cannot_be_written_costs_a_resume_point_not_the_run(
        recorder: Callable[..., Recorder], spec_for: SpecFor, caplog: pytest.LogCaptureFixture) -> None:
    def full_disk(data: bytes) -> None:
        raise OSError(28, "No space left on device")

    record = recorder(stop_after_steps=7)
    spec = spec_for(SMALL_MLP, epochs=2, progress_every_steps=1, checkpoint={"min_interval_s": 3600})
    result = run_training(spec, dataclasses.replace(record.context(), save_checkpoint=full_disk))
    assert result.status == "stopped" and result.step == 7
    assert "could not be written: the job resumes from its last checkpoint before that" in caplog.text
    assert not [t for t in threading.enumerate() if t.name == "checkpoint-writer"]  # the writer's thread ended
