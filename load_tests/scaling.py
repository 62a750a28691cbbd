"""Data-parallel scaling: one process against two ranks on the same spec and global batch, side by side.

``python -m load_tests.scaling [--out DIR] [--rounds N] [--steps N]``: each spec trains ``--steps``
steps in one process and then as two ranks (gloo over loopback, ``run_training`` with a
``Distributed``), every process with one torch thread, rounds interleaved so machine noise falls on
both alike. Throughput is the loop's own ``samples_per_s`` over its report windows (training time
only: validation is left out), the median of the windows after the first; for two ranks it is the
whole run's rate (both ranks' samples), next to each rank's. Printed and written to
``DIR/scaling-<time>.json``: samples/s, speedup (two ranks / one process) and scaling efficiency
(speedup / 2).

What this shows on one CPU machine: the cost of the algorithm (a gradient all-reduce and one small
agreement all-reduce per step, each rank doing half the rows) when both ranks have a core of their
own and talk over loopback. A rank's half batch is less work than the whole one, but not half the time:
small matrices use a core less well, so small per-rank batches scale worst. What it cannot show:
NCCL, GPUs, or a real network's bandwidth and latency between nodes; the all-reduce there costs
what the interconnect makes it cost, and only a multi-GPU cluster can measure that.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from load_tests.machine import machine_info, write_results
from node_runtime.training import Distributed, TrainingContext, run_training
from node_runtime.training.distributed import join
from shared.jobspec import parse_job_spec

REPO = Path(__file__).resolve().parents[1]
SPAWN = multiprocessing.get_context("spawn")
SPECS: list[dict[str, Any]] = [
    {"name": "digits-mlp", "model": {"type": "mlp", "hidden": [128, 64], "norm": "layernorm"},
     "dataset": "digits", "training": {"batch_size": 64}},
    {"name": "digits-mlp, batch 512", "model": {"type": "mlp", "hidden": [128, 64], "norm": "layernorm"},
     "dataset": "digits", "training": {"batch_size": 512}},
    {"name": "small-transformer", "model": {"type": "transformer", "d_model": 64, "n_layers": 2, "n_heads": 4,
                                            "context": 64},
     "dataset": "tiny-shakespeare", "training": {"batch_size": 16}},
    {"name": "small-transformer, batch 64", "model": {"type": "transformer", "d_model": 64, "n_layers": 2,
                                                      "n_heads": 4, "context": 64},
     "dataset": "tiny-shakespeare", "training": {"batch_size": 64}},
]
WINDOWS = 8  # report windows per run; the first is left out (DDP builds its buckets at the first step)


def spec_for(spec: dict[str, Any], steps: int) -> dict[str, Any]:
    raw = {**spec, "training": {**spec["training"], "epochs": None, "max_steps": steps,
                                "progress_every_steps": max(1, steps // WINDOWS), "progress_every_s": 3600.0,
                                "checkpoint": {"enabled": False}}}
    raw.pop("name", None)
    return parse_job_spec(raw)


def over_loopback(rank: int, world_size: int, ports: multiprocessing.Queue[tuple[str, int]]) -> Distributed:
    """Rank ``rank``'s place in a run on this machine: the rendezvous goes through ``ports``."""

    def publish_master(port: int) -> None:
        for _ in range(world_size - 1):
            ports.put(("127.0.0.1", port))

    def find_master(deadline_s: float) -> tuple[str, int]:
        return ports.get(timeout=deadline_s)

    return Distributed(rank, world_size, "127.0.0.1", publish_master, find_master)


def rank_main(rank: int, world_size: int, spec: dict[str, Any], ports: multiprocessing.Queue[tuple[str, int]],
              results: multiprocessing.Queue[Any]) -> None:
    """One process of a run: rank ``rank`` of ``world_size`` (1: a plain single-process run); rank 0
    sends its reports back."""
    received: list[dict[str, Any]] = []
    gang = over_loopback(rank, world_size, ports) if world_size > 1 else None
    run_training(spec, TrainingContext(report=received.append, should_stop=lambda: False,
                                       save_checkpoint=lambda data: None, cpu_threads=1, distributed=gang))
    if rank == 0:
        results.put(received)


def agreement_main(rank: int, world_size: int, rounds: int, ports: multiprocessing.Queue[tuple[str, int]],
                   results: multiprocessing.Queue[Any]) -> None:
    """Time the per-step agreement (one all-reduce of three integers) between idle ranks; rank 0 sends
    the mean in microseconds."""
    torch.set_num_threads(1)
    with join(over_loopback(rank, world_size, ports), torch.device("cpu")) as gang:
        gang.agree(0, False, False)  # the first one connects
        started = time.perf_counter()
        for _ in range(rounds):
            gang.agree(0, False, False)
        if rank == 0:
            results.put(1e6 * (time.perf_counter() - started) / rounds)


def in_processes(target: Any, world_size: int, *args: Any) -> Any:
    """Run ``target(rank, world_size, *args, ports, results)`` in ``world_size`` fresh processes; what rank
    0 sends back."""
    ports: multiprocessing.Queue[tuple[str, int]] = SPAWN.Queue()
    results: multiprocessing.Queue[Any] = SPAWN.Queue()
    processes = [SPAWN.Process(target=target, args=(rank, world_size, *args, ports, results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    result = results.get(timeout=1800)
    for process in processes:
        process.join(timeout=120)
        if process.exitcode != 0:
            raise RuntimeError(f"a rank of a {world_size}-process run exited with {process.exitcode}")
    return result


def run(spec: dict[str, Any], world_size: int) -> dict[str, float]:
    """Rank 0's median window rates: the run's samples/s and each rank's."""
    received = in_processes(rank_main, world_size, spec)
    windows = [report["metrics"] for report in received[1:]]
    rates = {"samples_per_s": statistics.median(window["samples_per_s"] for window in windows)}
    for rank in range(world_size if world_size > 1 else 0):
        name = f"samples_per_s/rank{rank}"
        rates[name] = statistics.median(window[name] for window in windows)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "load_tests" / "results"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=240, help="training steps per run (default 240)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()  # two ranks need both cores: anything else running skews them most
    agreement_us = in_processes(agreement_main, 2, 500)
    print(f"one agreement (all-reduce of 3 integers, 2 idle ranks over loopback): {agreement_us:.0f} us", flush=True)
    rows = []
    print(f"{'spec':<28} {'batch':>5} {'1 proc/s':>9} {'2 ranks/s':>9} {'rank0/s':>8} {'rank1/s':>8} "
          f"{'speedup':>7} {'effic.':>6}", flush=True)
    for named in SPECS:
        spec = spec_for(named, args.steps)
        one: list[float] = []
        two: list[dict[str, float]] = []
        for _ in range(args.rounds):
            one.append(run(spec, 1)["samples_per_s"])
            two.append(run(spec, 2))
        alone = statistics.median(one)
        pair = statistics.median(rates["samples_per_s"] for rates in two)
        per_rank = [statistics.median(rates[f"samples_per_s/rank{rank}"] for rates in two) for rank in (0, 1)]
        speedup = pair / alone
        row = {"spec": named["name"], "global_batch": spec["training"]["batch_size"], "steps": args.steps,
               "one_process_samples_per_s": round(alone, 1), "two_ranks_samples_per_s": round(pair, 1),
               "rank_samples_per_s": [round(rate, 1) for rate in per_rank], "speedup": round(speedup, 3),
               "efficiency": round(speedup / 2, 3), "runs_one_process": [round(rate, 1) for rate in one],
               "runs_two_ranks": [round(rates["samples_per_s"], 1) for rates in two]}
        rows.append(row)
        print(f"{row['spec']:<28} {row['global_batch']:>5} {alone:>9.0f} {pair:>9.0f} {per_rank[0]:>8.0f} "
              f"{per_rank[1]:>8.0f} {speedup:>7.2f} {speedup / 2:>6.2f}", flush=True)
    result = {"command": "python -m load_tests.scaling " + " ".join(argv if argv is not None else sys.argv[1:]),
              "steps": args.steps, "rounds": args.rounds, "threads_per_process": 1, "backend": "gloo, loopback",
              "agreement_allreduce_us": round(agreement_us, 1), "torch": torch.__version__,
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()],
              "machine": machine_info(), "rows": rows}
    path = write_results(args.out, "scaling", result)
    print(f"scaling: {path} (load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
