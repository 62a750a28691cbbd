"""What step checkpoints cost a training step, measured side by side in one run.

``python -m load_tests.checkpoints [--out DIR] [--rounds N] [--steps N]``: each spec trains the same
steps in one process under four settings, interleaved round by round so that machine noise falls on
all of them alike: checkpoints off; every ``min_interval_s`` (1 s) written off the training thread
(what nodes do); the same written on the training thread (what the loop did before); and at every
step boundary (``min_interval_s`` 0, the worst case). The checkpoint callback computes the digests a
job process commits to (``state_digests``), as a node does. A step's time is the wall time between the
loop's stop checks, so copies, reports and anything else the training thread does are in it. Printed
and written to ``DIR/checkpoints-<time>.json``: the median step time and its ratio to "off".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from load_tests.machine import machine_info, write_results
from node_runtime.training import TrainingContext, loop, run_training
from node_runtime.training.checkpoints import Snapshot, state_digests
from shared.jobspec import parse_job_spec

REPO = Path(__file__).resolve().parents[1]
SPECS: list[dict[str, Any]] = [
    {"name": "digits-mlp", "model": {"type": "mlp", "hidden": [128, 64], "norm": "layernorm"},
     "dataset": "digits", "training": {"batch_size": 64}},
    {"name": "small-transformer", "model": {"type": "transformer", "d_model": 64, "n_layers": 2, "n_heads": 4,
                                            "context": 64},
     "dataset": "tiny-shakespeare", "training": {"batch_size": 16}},
    {"name": "tiny-shakespeare example",  # examples/tiny-shakespeare.json's model
     "model": {"type": "transformer", "d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 512, "context": 64},
     "dataset": "tiny-shakespeare", "training": {"batch_size": 12}},
]
SETTINGS = {"off": {"enabled": False}, "every 1 s, off-thread": {"min_interval_s": 1.0},
            "every 1 s, on-thread": {"min_interval_s": 1.0}, "every step, off-thread": {"min_interval_s": 0.0}}
WARMUP_STEPS = 20


class _OnThreadWriter:
    """The loop's writer, but encoding on the caller's (training) thread: the cost being compared."""

    def __init__(self, save: Any) -> None:
        self.save = save

    last_error = None

    def submit(self, snapshot: Snapshot) -> None:
        self.save(snapshot.encode())

    def wait(self) -> None:
        pass

    def close(self) -> None:
        pass


def run(spec: dict[str, Any], setting: str, steps: int) -> dict[str, Any]:
    raw = {**spec, "training": {**spec["training"], "max_steps": steps, "progress_every_steps": 100,
                                "checkpoint": SETTINGS[setting]}}
    raw.pop("name", None)
    stops: list[float] = []
    saved: list[int] = []

    def save(data: bytes) -> None:
        state_digests(data)
        saved.append(len(data))

    def should_stop() -> bool:
        stops.append(time.perf_counter())
        return False

    writer = loop._CheckpointWriter
    if setting.endswith("on-thread"):
        loop._CheckpointWriter = _OnThreadWriter  # type: ignore[assignment,misc]
    try:
        run_training(parse_job_spec(raw), TrainingContext(report=lambda p: None, should_stop=should_stop,
                                                          save_checkpoint=save, cpu_threads=1))
    finally:
        loop._CheckpointWriter = writer  # type: ignore[misc]
    timed = stops[WARMUP_STEPS:]
    return {"step_ms": 1000 * (timed[-1] - timed[0]) / (len(timed) - 1), "checkpoints": len(saved),
            "checkpoint_bytes": saved[-1] if saved else 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.checkpoints", description=__doc__)
    parser.add_argument("--out", default=str(REPO / "load_tests" / "results"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    args = parser.parse_args(argv)
    if args.steps < WARMUP_STEPS + 2:
        parser.error(f"--steps must be at least {WARMUP_STEPS + 2}: the first {WARMUP_STEPS} are not timed")
    torch.set_num_threads(1)
    rows = []
    print(f"{'spec':<26} {'setting':<24} {'step ms':>8} {'x off':>6} {'checkpoints':>11} {'MB each':>8}",
          flush=True)
    for spec in SPECS:
        times: dict[str, list[float]] = {setting: [] for setting in SETTINGS}
        last: dict[str, dict[str, Any]] = {}
        for _ in range(args.rounds):
            for setting in SETTINGS:
                last[setting] = run(spec, setting, args.steps)
                times[setting].append(last[setting]["step_ms"])
        base = statistics.median(times["off"])
        for setting, measured in times.items():
            median = statistics.median(measured)
            row = {"spec": spec["name"], "setting": setting, "step_ms": round(median, 3),
                   "ratio_to_off": round(median / base, 3), "runs_ms": [round(t, 3) for t in measured],
                   "checkpoints_per_run": last[setting]["checkpoints"],
                   "checkpoint_mb": round(last[setting]["checkpoint_bytes"] / 2**20, 2)}
            rows.append(row)
            print(f"{row['spec']:<26} {setting:<24} {row['step_ms']:>8.2f} {row['ratio_to_off']:>6.3f} "
                  f"{row['checkpoints_per_run']:>11} {row['checkpoint_mb']:>8.2f}", flush=True)
    result = {"command": "python -m load_tests.checkpoints " + " ".join(argv if argv is not None else sys.argv[1:]),
              "steps": args.steps, "rounds": args.rounds, "threads": 1, "machine": machine_info(), "rows": rows}
    path = write_results(args.out, "checkpoints", result)
    print(f"checkpoints: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
