"""The memory estimate against what training really uses, side by side in one run.

``python -m load_tests.memory [--out DIR] [--steps N] [--only NAME]``: for each spec below, a fresh
process imports torch and the training package (its resident memory then is ``framework_mb``), then
trains N steps on the CPU; its peak resident memory is what the job used, torch included, as the
estimate counts it. Printed and written to ``DIR/memory-<time>.json``: the estimate, the measured peak
and their ratio (measured / estimate, which must stay at or below 1 for the node's limit to be fair).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from load_tests.machine import machine_info, write_results
from shared.jobspec import known_data_info, parse_job_spec
from shared.resources import estimate

REPO = Path(__file__).resolve().parents[1]

SPECS: list[dict[str, Any]] = [
    {"name": "digits-mlp", "model": {"type": "mlp", "hidden": [128, 64]}, "dataset": "digits",
     "training": {"epochs": 1}},
    {"name": "wide-mlp", "model": {"type": "mlp", "hidden": [2048, 2048], "norm": "layernorm"},
     "dataset": {"name": "blobs", "n_samples": 20000, "n_features": 256, "n_classes": 10},
     "training": {"epochs": 1, "batch_size": 1024}},
    {"name": "big-blobs", "model": {"type": "mlp", "hidden": [64]},
     "dataset": {"name": "blobs", "n_samples": 200_000, "n_features": 512},
     "training": {"epochs": 1, "batch_size": 256}},
    {"name": "digits-cnn", "model": {"type": "cnn", "channels": [32, 64]}, "dataset": "digits",
     "training": {"epochs": 1, "batch_size": 512}},
    {"name": "text-transformer", "model": {"type": "transformer"}, "dataset": "tiny-text",
     "training": {"epochs": 1, "batch_size": 64}},
    {"name": "long-context", "model": {"type": "transformer", "d_model": 256, "n_heads": 8, "context": 512},
     "dataset": "tiny-text", "training": {"epochs": 1, "batch_size": 32}},
]

# Runs in the child: baseline after imports, then N steps; prints one JSON line.
CHILD = r"""
import json, resource, sys
import torch
from node_runtime.training import TrainingContext, run_training
torch.set_num_threads(2)
spec, steps = json.loads(sys.argv[1]), int(sys.argv[2])
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
baseline = rss_mb()
taken = [0]
def should_stop():
    taken[0] += 1
    return taken[0] > steps
ctx = TrainingContext(report=lambda p: None, should_stop=should_stop, save_checkpoint=lambda b: None)
run_training(spec, ctx)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"baseline_mb": baseline, "peak_mb": peak}))
"""


def measure(spec: dict[str, Any], steps: int) -> dict[str, Any]:
    parsed = parse_job_spec(spec)
    need = estimate(parsed, known_data_info(parsed["dataset"]))
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec), str(steps)], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{spec['name']}: {out.stderr[-2000:]}")
    child = json.loads(out.stdout.strip().splitlines()[-1])
    used = child["peak_mb"]  # the whole process: the estimate counts torch itself
    return {"name": spec["name"], "estimated_mb": need.memory_mb, "driver": need.driver,
            "framework_mb": round(child["baseline_mb"]), "measured_mb": round(used, 1),
            "ratio": round(used / need.memory_mb, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.memory", description=__doc__)
    parser.add_argument("--out", default=str(REPO / "load_tests" / "results"))
    parser.add_argument("--steps", type=int, default=5, help="training steps per spec (default 5)")
    parser.add_argument("--only", action="append", help="measure only this spec (repeatable)")
    args = parser.parse_args(argv)
    specs = [spec for spec in SPECS if not args.only or spec["name"] in args.only]
    rows = []
    print(f"{'spec':<18} {'estimate MiB':>12} {'measured MiB':>12} {'ratio':>6}  driver", flush=True)
    for spec in specs:
        row = measure(spec, args.steps)
        rows.append(row)
        print(f"{row['name']:<18} {row['estimated_mb']:>12} {row['measured_mb']:>12} {row['ratio']:>6}  "
              f"{row['driver']}", flush=True)
    over = [row["name"] for row in rows if row["ratio"] > 1]
    result = {"command": "python -m load_tests.memory " + " ".join(argv if argv is not None else sys.argv[1:]),
              "steps": args.steps, "machine": machine_info(), "rows": rows, "under_estimate": over}
    path = write_results(args.out, "memory", result)
    print(f"memory: {'every estimate held' if not over else 'measured above the estimate: ' + ', '.join(over)}; "
          f"{path}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
