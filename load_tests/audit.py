"""What audits cost, and whether they ever reject honest work: an honest CPU cluster, side by side.

``python -m load_tests.audit [--jobs-per-type N] [--nodes K] [--out DIR]`` runs the same jobs (N of
each model type: mlp, cnn, sequential, transformer; seeds 0..N-1) twice on a fresh ``cyxwiz serve`` with
K node runtimes (1 slot, 1 torch thread each):

1. ``every``: CYXWIZ_AUDIT_FRACTION=1, every result audited. Counts false rejections (an honest cluster
   must have none) and measures one replay's node time against its job's training time.
2. ``default``: the shipped settings (probation until 3 passed audits, then 10 %). Measures the extra
   node time audits cost per job, probation included, as a fraction of the training node time.

Node time is what the control plane saw: an attempt from its assignment to its final state, a
verification task from its assignment to its verdict (process start-up included in both). Printed and
written to ``DIR/audit-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from load_tests.machine import machine_info, write_results
from load_tests.stack import LocalStack

REPO = Path(__file__).resolve().parents[1]
DIGITS = {"name": "digits", "val_fraction": 0.2}
SPECS: dict[str, dict[str, Any]] = {
    "mlp": {"name": "mlp", "model": {"type": "mlp", "hidden": [128, 64], "norm": "layernorm"}, "dataset": DIGITS,
            "training": {"epochs": 3, "checkpoint": {"min_interval_s": 0.2}}},
    "cnn": {"name": "cnn", "model": {"type": "cnn", "channels": [8], "hidden": [32]}, "dataset": DIGITS,
            "training": {"epochs": 2}},
    "sequential": {"name": "sequential", "dataset": DIGITS,
                   "model": {"type": "sequential", "layers": [{"type": "linear", "out": 64}, {"type": "gelu"},
                                                              {"type": "dropout", "p": 0.1},
                                                              {"type": "linear", "out": 10}]},
                   "training": {"epochs": 3, "checkpoint": {"min_interval_s": 0.2}}},
    "transformer": {"name": "transformer", "dataset": {"name": "tiny-text"},
                    "model": {"type": "transformer", "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64,
                              "context": 32, "dropout": 0.1},
                    "training": {"epochs": 1, "batch_size": 32, "learning_rate": 0.003}},
}


def run_phase(name: str, env: dict[str, str], jobs_per_type: int, nodes: int, workdir: Path) -> dict[str, Any]:
    stack = LocalStack(env=env, log_path=workdir / f"{name}-server.log").start()
    processes = []
    try:
        creds = stack.credentials
        for index in range(nodes):
            log = open(workdir / f"{name}-node-{index}.log", "ab")  # noqa: SIM115 - lives with the process
            node_env = {**os.environ, "CYXWIZ_JOIN_TOKEN": creds["join_token"], "PYTHONUNBUFFERED": "1",
                        "CYXWIZ_DATA_DIR": str(workdir / f"{name}-home")}
            node_env.pop("CYXWIZ_REDIS_URL", None)
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "cyxwiz.cli", "node", "--api", stack.api_url, "--slots", "1", "--name",
                 f"{name}-node-{index}", "--torch-threads", "1"], env=node_env, cwd=REPO, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        headers = {"Authorization": f"Bearer {creds['api_key']}"}
        with httpx.Client(base_url=stack.api_url, timeout=30, headers=headers) as http:
            deadline = time.monotonic() + 120
            while sum(n["status"] == "online" for n in http.get("/v1/nodes").json()["nodes"]) < nodes:
                if time.monotonic() > deadline:
                    raise RuntimeError("the node runtimes did not register")
                time.sleep(0.5)
            started = time.monotonic()
            jobs = {kind: [http.post("/v1/jobs", json={**spec, "training": {**spec["training"], "seed": seed}})
                           .json()["job_id"] for seed in range(jobs_per_type)] for kind, spec in SPECS.items()}
            finished: dict[str, dict[str, Any]] = {}
            while len(finished) < jobs_per_type * len(SPECS):
                for ids in jobs.values():
                    for job_id in ids:
                        if job_id not in finished:
                            job = http.get(f"/v1/jobs/{job_id}").json()
                            if job["status"] in ("completed", "failed", "cancelled"):
                                finished[job_id] = job
                if time.monotonic() - started > 3600:
                    raise RuntimeError("the jobs did not finish within an hour")
                time.sleep(1.0)
            wall_s = time.monotonic() - started
            node_list = http.get("/v1/nodes").json()["nodes"]
        return summarize(name, jobs, finished, node_list, redis.Redis.from_url(creds["redis_url"],
                                                                               decode_responses=True), wall_s)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        stack.stop()


def summarize(name: str, jobs: dict[str, list[str]], finished: dict[str, dict[str, Any]],
              node_list: list[dict[str, Any]], store: redis.Redis, wall_s: float) -> dict[str, Any]:
    per_type: dict[str, Any] = {}
    train_ms = replay_ms = 0
    ratios = []
    for kind, ids in jobs.items():
        outcomes: dict[str, int] = {}
        kind_train = kind_replay = 0
        for job_id in ids:
            job = finished[job_id]
            outcome = (job.get("verification") or {}).get("status") or "none"
            outcomes[f"{job['status']}/{outcome}"] = outcomes.get(f"{job['status']}/{outcome}", 0) + 1
            h = store.hgetall(f"cyxwiz:job:{job_id}")
            states = {k: json.loads(v) for k, v in store.hgetall(f"cyxwiz:job:{job_id}:states").items()}
            job_train = 0
            for number in range(1, int(h["attempt"]) + 1):
                final = states.get(f"a{number}final")
                if final and h.get(f"assigned_ms:{number}"):
                    job_train += int(final["ms"]) - int(h[f"assigned_ms:{number}"])
            job_replay = 0
            for key in store.scan_iter(f"cyxwiz:verify:v-{job_id[2:]}-*"):
                t = store.hgetall(key)
                if t.get("done_ms") and t.get("assigned_ms"):
                    job_replay += int(t["done_ms"]) - int(t["assigned_ms"])
            kind_train += job_train
            kind_replay += job_replay
            if job_replay and job_train:
                ratios.append(job_replay / job_train)
        per_type[kind] = {"outcomes": outcomes, "train_node_s": kind_train / 1000, "replay_node_s": kind_replay / 1000,
                          "replay_over_train": round(kind_replay / kind_train, 3) if kind_train else None}
        train_ms += kind_train
        replay_ms += kind_replay
    audited = sum(1 for job in finished.values() if (job.get("verification") or {}).get("status") == "passed")
    rejected = sum(1 for job in finished.values() if (job.get("verification") or {}).get("status") == "failed")
    return {
        "phase": name, "jobs": len(finished), "wall_s": round(wall_s, 1),
        "completed": sum(job["status"] == "completed" for job in finished.values()),
        "audits_passed_jobs": audited, "false_rejections": rejected,
        "audits_failed_nodes": sum(n["audits_failed"] for n in node_list),
        "slashed": sum(1 for n in node_list if n["reputation"] == 0.0),
        "train_node_s": train_ms / 1000, "replay_node_s": replay_ms / 1000,
        "extra_node_time_fraction": round(replay_ms / train_ms, 3) if train_ms else None,
        "replay_over_train_per_audited_job": round(sum(ratios) / len(ratios), 3) if ratios else None,
        "per_type": per_type,
        "nodes": [{k: n[k] for k in ("name", "probation", "audits_passed", "audits_failed", "capability",
                                     "claimed_capability", "observed_capability", "flag")} for n in node_list],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs-per-type", type=int, default=20, help="jobs of each model type (default 20)")
    parser.add_argument("--nodes", type=int, default=3, help="node runtimes, 1 slot each (default 3)")
    parser.add_argument("--out", type=Path, default=Path("load_tests/results"), help="where the JSON goes")
    parser.add_argument("--only", choices=("every", "default"), help="run one phase")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"cyxwiz-audit-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    phases = {"every": {"CYXWIZ_AUDIT_FRACTION": "1"}, "default": {}}
    results = []
    for name, env in phases.items():
        if args.only and name != args.only:
            continue
        print(f"audit: phase {name} ({args.jobs_per_type} jobs per type, {args.nodes} nodes)...", flush=True)
        result = run_phase(name, env, args.jobs_per_type, args.nodes, workdir)
        results.append(result)
        print(f"  {result['completed']}/{result['jobs']} completed in {result['wall_s']} s; audits passed on "
              f"{result['audits_passed_jobs']} jobs, false rejections {result['false_rejections']}, nodes slashed "
              f"{result['slashed']}; extra node time {result['extra_node_time_fraction']} of training "
              f"(replay / training per audited job {result['replay_over_train_per_audited_job']})", flush=True)
    report = {"benchmark": "audit", "machine": machine_info(), "jobs_per_type": args.jobs_per_type,
              "nodes": args.nodes, "phases": results, "logs": str(workdir)}
    path = write_results(args.out, "audit", report)
    print(f"audit: written to {path}")
    return 0 if all(r["false_rejections"] == 0 and r["completed"] == r["jobs"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
