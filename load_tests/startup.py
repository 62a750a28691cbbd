"""Node start and job start, cold against warm job processes, side by side in one run.

``python -m load_tests.startup [--rounds N] [--jobs K] [--epochs E] [--baseline DIR] [--out DIR]`` starts a
real stack (``cyxwiz serve``: the embedded Valkey and the gateway) and, each round, one node runtime
(``python -m node_runtime``, one slot) with cold job processes (``--no-warm-processes``: a fresh interpreter
per job) and one with warm ones (forked from the preloaded forkserver), the order flipped every round.
Only one node runs at a time. For each node it measures:

- ``register_s``: from starting the node's process to the node being online in GET /v1/nodes (polled
  every 20 ms);
- ``startup_s`` of K digits-MLP jobs run one after another: from the runtime's taking the assignment to
  the job's first training step, as the job process reports it in its progress metrics. The first job is
  submitted the moment the node is registered (a warm node may still be preloading then: ``first``);
  the later ones find the node idle (``later``);
- ``job_s``: from submitting a job to seeing it completed (polled every 50 ms).

``--baseline DIR`` (a tree of an earlier commit, e.g. ``git archive <commit> | tar -x -C DIR``) also starts
node runtimes from that tree each round, for ``register_s`` only: older runtimes report no startup_s.

Prints medians and ratios (cold / warm; baseline / now) and writes ``startup-<UTC time>.json`` under
DIR (default ``load_tests/results``) with every sample, the machine, versions and commit.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from load_tests.machine import machine_info, write_results
from load_tests.servers import BENCH_LIMITS
from load_tests.stack import LocalStack
from shared.jobspec import DIGITS_MLP_EXAMPLE

REPO = Path(__file__).resolve().parents[1]
NODE_POLL_S = 0.02
JOB_POLL_S = 0.05
TERMINAL = ("completed", "failed", "cancelled")
MODES: dict[str, list[str]] = {"cold": ["--no-warm-processes"], "warm": ["--warm-processes"], "baseline": []}


class Bench:
    """The stack, an admin client of its API, and the node runtimes started on it one at a time."""

    def __init__(self, stack: LocalStack, http: httpx.Client, logs: Path, spec: dict[str, Any]) -> None:
        self.stack, self.http, self.logs, self.spec = stack, http, logs, spec

    def node_run(self, mode: str, name: str, jobs: int, tree: Path) -> dict[str, Any]:
        env = {**os.environ, "CYXWIZ_JOIN_TOKEN": self.stack.credentials["join_token"], "PYTHONUNBUFFERED": "1",
               "CYXWIZ_DATA_DIR": str(self.logs / "home")}
        env.pop("CYXWIZ_REDIS_URL", None)
        command = [sys.executable, "-m", "node_runtime", "--api", self.stack.api_url, "--slots", "1",
                   "--name", name, *MODES[mode]]
        with open(self.logs / f"{name}.log", "ab") as log:
            started = time.monotonic()
            process = subprocess.Popen(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        try:
            register_s = self._registered(name, started, process)
            runs = [self._job() for _ in range(jobs)]
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return {"mode": mode, "node": name, "register_s": round(register_s, 3), "jobs": runs}

    def _registered(self, name: str, started: float, process: subprocess.Popen[bytes]) -> float:
        while time.monotonic() - started < 120:
            if any(n["name"] == name and n["status"] == "online" for n in self.http.get("/v1/nodes").json()["nodes"]):
                return time.monotonic() - started
            if process.poll() is not None:
                raise RuntimeError(f"node {name} exited with {process.returncode} before registering")
            time.sleep(NODE_POLL_S)
        raise RuntimeError(f"node {name} did not register within 120 s")

    def _job(self) -> dict[str, Any]:
        submitted = time.monotonic()
        job_id = self.http.post("/v1/jobs", json=self.spec).raise_for_status().json()["job_id"]
        while (job := self.http.get(f"/v1/jobs/{job_id}").json())["status"] not in TERMINAL:
            if time.monotonic() - submitted > 300:
                raise RuntimeError(f"job {job_id} did not finish within 300 s")
            time.sleep(JOB_POLL_S)
        job_s = time.monotonic() - submitted
        if job["status"] != "completed":
            raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
        events = self.http.get(f"/v1/jobs/{job_id}/progress", params={"limit": "2000"}).json()["events"]
        startup = [e["metrics"]["startup_s"] for e in events if "startup_s" in e["metrics"]]
        return {"job_id": job_id, "startup_s": startup[0] if startup else None, "job_s": round(job_s, 3)}


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _ratio(slow: float | None, fast: float | None) -> float | None:
    return round(slow / fast, 1) if slow and fast else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per mode: register_s, startup_s of first and later jobs, job_s of later jobs."""
    summary: dict[str, Any] = {}
    for mode in MODES:
        mine = [run for run in runs if run["mode"] == mode]
        if not mine:
            continue
        first = [run["jobs"][0] for run in mine if run["jobs"]]
        later = [job for run in mine for job in run["jobs"][1:]]
        summary[mode] = {
            "nodes": len(mine), "register_s": _median([run["register_s"] for run in mine]),
            "startup_first_s": _median([job["startup_s"] for job in first if job["startup_s"] is not None]),
            "startup_later_s": _median([job["startup_s"] for job in later if job["startup_s"] is not None]),
            "job_later_s": _median([job["job_s"] for job in later])}
    cold, warm = summary.get("cold", {}), summary.get("warm", {})
    summary["cold_over_warm"] = {key: _ratio(cold.get(key), warm.get(key)) for key in
                                 ("register_s", "startup_first_s", "startup_later_s", "job_later_s")}
    if "baseline" in summary:
        now = _median([run["register_s"] for run in runs if run["mode"] != "baseline"])
        summary["baseline_over_now"] = {"register_s": _ratio(summary["baseline"]["register_s"], now)}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="nodes started per mode (default 3)")
    parser.add_argument("--jobs", type=int, default=5, help="jobs run one after another on each node (default 5)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each digits-MLP job (default 2)")
    parser.add_argument("--baseline", type=Path, help="a tree of an earlier commit: its node runtimes' register_s")
    parser.add_argument("--out", type=Path, default=REPO / "load_tests" / "results", help="where the JSON goes")
    args = parser.parse_args(argv)
    spec = {**DIGITS_MLP_EXAMPLE, "training": {**DIGITS_MLP_EXAMPLE["training"], "epochs": args.epochs}}
    logs = Path(tempfile.mkdtemp(prefix="cyxwiz-startup-"))
    runs: list[dict[str, Any]] = []
    with LocalStack(env=BENCH_LIMITS, log_path=logs / "server.log") as stack, \
            httpx.Client(base_url=stack.api_url, timeout=30,
                         headers={"Authorization": f"Bearer {stack.credentials['api_key']}"}) as http:
        bench = Bench(stack, http, logs, spec)
        for round_ in range(args.rounds):
            order = ["cold", "warm"] if round_ % 2 == 0 else ["warm", "cold"]
            for mode in order + (["baseline"] if args.baseline else []):
                tree = args.baseline.resolve() if mode == "baseline" else REPO
                run = bench.node_run(mode, f"startup-{mode}-{round_}", 0 if mode == "baseline" else args.jobs, tree)
                runs.append(run)
                startups = ", ".join(f"{job['startup_s']:.3f}" for job in run["jobs"] if job["startup_s"] is not None)
                print(f"round {round_} {mode:>8}: registered after {run['register_s']:.3f} s; startup_s {startups}",
                      flush=True)
    summary = summarize(runs)
    print(f"\n{'mode':>8} {'register_s':>10} {'startup first':>13} {'startup later':>13} {'job later':>10}  (medians)")
    for mode in MODES:
        if mode in summary:
            row = summary[mode]
            print(f"{mode:>8} {row['register_s']!s:>10} {row['startup_first_s']!s:>13} "
                  f"{row['startup_later_s']!s:>13} {row['job_later_s']!s:>10}")
    ratios = summary["cold_over_warm"]
    print(f"cold / warm: startup first {ratios['startup_first_s']}x, later {ratios['startup_later_s']}x, "
          f"job {ratios['job_later_s']}x, register {ratios['register_s']}x")
    if "baseline_over_now" in summary:
        print(f"baseline / now: register {summary['baseline_over_now']['register_s']}x")
    command = "python -m load_tests.startup " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"benchmark": "startup", "command": command, "machine": machine_info(),
              "torch": metadata.version("torch"), "rounds": args.rounds, "jobs": args.jobs, "spec": spec,
              "baseline": str(args.baseline) if args.baseline else None, "summary": summary, "runs": runs,
              "logs": str(logs)}
    path = write_results(args.out, "startup", result)
    print(f"startup: written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
