"""Helpers for the training tests: a recorder that plays the executor's side of TrainingContext."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from node_runtime.training import TrainingContext
from shared.jobspec import parse_job_spec


class Recorder:
    """Collects reports and checkpoints, and can ask the run to stop.

    ``stop_after_steps`` fires once a report says that many steps are done (pair it with
    ``progress_every_steps=1``); ``stop_after_checkpoints`` once that many checkpoints arrived.
    """

    def __init__(self, stop_after_steps: int | None = None, stop_after_checkpoints: int | None = None) -> None:
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[bytes] = []
        self.stop_checks = 0
        self.stop_after_steps, self.stop_after_checkpoints = stop_after_steps, stop_after_checkpoints

    def should_stop(self) -> bool:
        self.stop_checks += 1
        if self.stop_after_checkpoints is not None and len(self.checkpoints) >= self.stop_after_checkpoints:
            return True
        steps = self.reports[-1]["step"] if self.reports else 0
        return self.stop_after_steps is not None and steps >= self.stop_after_steps

    def context(self, **options: Any) -> TrainingContext:
        return TrainingContext(report=self.reports.append, should_stop=self.should_stop,
                               save_checkpoint=self.checkpoints.append, **options)


@pytest.fixture(scope="session")
def recorder() -> Callable[..., Recorder]:
    """The Recorder class (fixtures, not imports: this test folder is not a package path)."""
    return Recorder


def make_spec(model: dict[str, Any], dataset: Any = "digits", **training: Any) -> dict[str, Any]:
    """A normalized spec: progress reports only at epoch ends unless the test asks for more."""
    return parse_job_spec({"model": model, "dataset": dataset,
                           "training": {"epochs": 1, "progress_every_steps": 10**6, "progress_every_s": 3600.0,
                                        **training}})


@pytest.fixture(scope="session")
def spec_for() -> Callable[..., dict[str, Any]]:
    """``make_spec``: a normalized spec from a model, a dataset and training overrides."""
    return make_spec


@pytest.fixture()
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "datasets"
    root.mkdir()
    return root
