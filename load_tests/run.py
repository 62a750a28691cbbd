"""A bounded, headless Locust run: ``python -m load_tests.run --duration S [--host URL] [--users N] [--out DIR]``.

Without ``--host`` it starts a local stack (``cyxwiz serve`` on a free port with a temporary data
dir) and points Locust at it with the credentials that ``serve`` wrote. On a machine with two or
more CPUs the server is pinned to CPU 0 and Locust to CPU 1 (``taskset``), so neither starves the
other. Results under DIR: Locust's own ``locust_stats.csv``/``locust_failures.csv``/``locust.json``
and a ``summary.json`` (per-endpoint counts, rates and percentiles, plus machine and commit).
Exit status 1 on any failed request (or no request at all), else 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from load_tests.machine import machine_info
from load_tests.stack import REPO, LocalStack, pinned

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m load_tests.run", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, required=True, help="seconds of load (after spawning)")
    p.add_argument("--host", help="an existing deployment (default: start a local stack)")
    p.add_argument("--users", type=int, default=20, help="simulated users, half nodes, half clients (default 20)")
    p.add_argument("--spawn-rate", type=float, help="users started per second (default: all within ~1 s)")
    p.add_argument("--out", default="results/load", help="results directory (default results/load)")
    return p.parse_args(argv)


def _cpus() -> tuple[str | None, str | None]:
    """(server CPUs, load generator CPUs) when there are enough cores to separate them."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return ("0", "1") if count >= 2 else (None, None)


def run_locust(host: str, users: int, spawn_rate: float, duration: float, out: Path, env: dict[str, str],
               cpus: str | None) -> int:
    command = pinned([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
                      "-u", str(users), "-r", str(spawn_rate), "-t", f"{max(1, round(duration))}s",
                      "--csv", str(out / "locust"), "--json-file", str(out / "locust"), "--only-summary",
                      "--stop-timeout", "5", "--loglevel", "WARNING", "--exit-code-on-error", "1"], cpus)
    with open(out / "locust.log", "wb") as log:
        done = subprocess.run(command, cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                              timeout=duration + 120)
    return done.returncode


def _number(raw: str) -> float | None:
    try:
        return float(raw)
    except (TypeError, ValueError):
        return None


def read_stats(out: Path) -> list[dict[str, Any]]:
    """Locust's stats CSV as one dict per endpoint (the last row is the aggregate)."""
    rows = []
    with open(out / "locust_stats.csv", newline="") as f:
        for row in csv.DictReader(f):
            rows.append({
                "type": row["Type"], "name": row["Name"],
                "requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                "rps": _number(row["Requests/s"]), "p50_ms": _number(row["50%"]),
                "p95_ms": _number(row["95%"]), "p99_ms": _number(row["99%"]),
                "max_ms": _number(row["Max Response Time"]),
            })
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'type':<7} {'name':<48} {'reqs':>7} {'fails':>6} {'req/s':>8} {'p50':>6} {'p99':>6}")
    for r in rows:
        print(f"{r['type']:<7} {r['name'][:48]:<48} {r['requests']:>7} {r['failures']:>6} "
              f"{(r['rps'] or 0):>8.1f} {(r['p50_ms'] or 0):>6.0f} {(r['p99_ms'] or 0):>6.0f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("locust*"):
        stale.unlink()
    spawn_rate = args.spawn_rate or float(max(1, args.users))
    server_cpus, load_cpus = _cpus() if not args.host else (None, None)
    stack = None
    env: dict[str, str] = {}
    host = args.host
    if host is None:
        stack = LocalStack(cpus=server_cpus, log_path=out / "server.log").start()
        env, host = stack.client_env(), stack.api_url
        print(f"load_tests.run: local stack at {host} (data dir {stack.data_dir})", flush=True)
    started = time.time()
    try:
        rc = run_locust(host, args.users, spawn_rate, args.duration, out, env, load_cpus)
    finally:
        if stack is not None:
            stack.stop()
    if not (out / "locust_stats.csv").exists():
        print(f"load_tests.run: Locust wrote no stats (exit {rc}); see {out / 'locust.log'}", file=sys.stderr)
        return 1
    rows = read_stats(out)
    total = next((r for r in rows if r["name"] == "Aggregated"), {"requests": 0, "failures": 0})
    summary = {
        "command": "python -m load_tests.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "host": args.host or "local stack (cyxwiz serve, embedded Valkey)",
        "users": args.users, "duration_s": args.duration, "wall_s": round(time.time() - started, 1),
        "pinning": {"server_cpus": server_cpus, "locust_cpus": load_cpus},
        "locust_exit_code": rc, "requests": total["requests"], "failures": total["failures"],
        "endpoints": rows, "machine": machine_info(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_table(rows)
    ok = rc == 0 and total["failures"] == 0 and total["requests"] > 0
    print(f"load_tests.run: {total['requests']} requests, {total['failures']} failures -> "
          f"{'PASS' if ok else 'FAIL'}; results in {out}", flush=True)
    if not ok and (out / "locust_failures.csv").exists():
        print((out / "locust_failures.csv").read_text(), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
