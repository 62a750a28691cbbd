"""Functions vs the bare endpoint: requests/s and p50/p99 of heartbeat, submit and progress at fixed
concurrency, side by side in one run.

Rounds interleave the four loads (bare, heartbeat, submit, progress) so that anything else running on
the machine hits all of them alike; each function's ratio is taken against the bare endpoint of the
same round, and the median over rounds is reported.

The store holds a realistic working set first: 1,000 heartbeating CPU nodes (one slot each), 100
nodes running 1,000 jobs that report progress, and 200 nodes with 256 slots each, so submissions are
placed on a node (the full path), not just queued.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

import orjson

from load_tests import httpload, servers
from load_tests.fleet import DIGITS_SPEC, register_fleet
from shared import jobs
from shared.auth import Principal
from shared.store import Store

LOADS = ("bare", "heartbeat", "submit", "progress")
HEARTBEAT_NODES = 1000
PROGRESS_JOBS = 1000


async def _working_set(redis_url: str) -> dict[str, Any]:
    creds = await servers.fresh_credentials(redis_url)
    store = Store(servers.bench_settings(redis_url, CYXWIZ_TTL_S="86400"))
    try:
        heartbeat_nodes = await register_fleet(store, HEARTBEAT_NODES, slots=1, prefix="hb")
        progress_nodes = await register_fleet(store, 100, slots=10, prefix="pr")
        tokens = {**heartbeat_nodes, **progress_nodes}
        running = []
        for _ in range(PROGRESS_JOBS):
            _, answer = await jobs.submit_job(store, Principal("bench", False), DIGITS_SPEC, None)
            running.append((answer["job_id"], answer["node_id"]))
        await register_fleet(store, 200, slots=256, prefix="sub")
    finally:
        await store.close()
    return {"creds": creds, "heartbeat_nodes": heartbeat_nodes, "tokens": tokens, "running": running}


def _templates(ws: dict[str, Any]) -> dict[str, list[bytes]]:
    host = "127.0.0.1"
    heartbeat = [httpload.raw_request(host, "POST", f"/v1/nodes/{node_id}/heartbeat", token, b"{}")
                 for node_id, token in ws["heartbeat_nodes"].items()]
    submit = [httpload.raw_request(host, "POST", "/v1/jobs", ws["creds"]["tenant_key"], orjson.dumps(DIGITS_SPEC))]
    report = (b'{"attempt": 1, "seq": ' + httpload.SEQ + b', "status": "running", "epoch": 1, "step": 10, '
              b'"total_steps": 100, "metrics": {"loss": 0.42, "accuracy": 0.87, "samples_per_s": 5120.0}}')
    progress = [httpload.raw_request(host, "POST", f"/v1/jobs/{job_id}/progress", ws["tokens"][node_id], report)
                for job_id, node_id in ws["running"]]
    return {"bare": heartbeat, "heartbeat": heartbeat, "submit": submit, "progress": progress}


def run(redis_url: str, gateway: tuple[str, int], bare: tuple[str, int], *, rounds: int, duration_s: float,
        concurrency: int, engine: str, load_cpus: str | None) -> dict[str, Any]:
    """``gateway`` and ``bare`` are (url, pid) of the two servers."""
    ws = asyncio.run(_working_set(redis_url))
    templates = _templates(ws)
    urls = {"bare": bare[0], "heartbeat": gateway[0], "submit": gateway[0], "progress": gateway[0]}
    pids = {"bare": bare[1], "heartbeat": gateway[1], "submit": gateway[1], "progress": gateway[1]}
    seq = 1
    for name in LOADS:  # warm-up: connections, caches, script loads
        warm = httpload.run_load(urls[name], templates[name], concurrency=concurrency, duration_s=1,
                                 engine=engine, cpus=load_cpus, seq_start=seq)
        seq += warm.requests + 10 * concurrency + 1000
    per_round: list[dict[str, Any]] = []
    for _ in range(rounds):
        row = {}
        for name in LOADS:
            cpu_before = servers.cpu_seconds(pids[name])
            result = httpload.run_load(urls[name], templates[name], concurrency=concurrency, duration_s=duration_s,
                                       engine=engine, cpus=load_cpus, seq_start=seq)
            cpu_after = servers.cpu_seconds(pids[name])
            seq += result.requests + 10 * concurrency + 1000  # reports stay in order across runs
            row[name] = result.as_dict()
            if cpu_before is not None and cpu_after is not None and result.requests:
                # Server CPU per request: requests/s one fully used core would give, whatever else runs.
                row[name]["server_cpu_us_per_request"] = round((cpu_after - cpu_before) / result.requests * 1e6, 1)
                row[name]["server_cpu_share"] = round((cpu_after - cpu_before) / result.duration_s, 3)
        per_round.append(row)
    return {"concurrency": concurrency, "duration_s": duration_s, "rounds": per_round,
            "working_set": {"heartbeat_nodes": HEARTBEAT_NODES, "progress_jobs": PROGRESS_JOBS,
                            "submit_nodes": "200 x 256 slots"},
            "summary": summarize(per_round)}


def summarize(per_round: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in LOADS:
        runs = [r[name] for r in per_round]
        bad = sum(v for run in runs for k, v in run["statuses"].items() if not k.startswith("2"))
        out[name] = {
            "rps": round(statistics.median(r["rps"] for r in runs), 1),
            "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 2),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 2),
            "non_2xx": bad, "errors": sum(r["errors"] for r in runs),
        }
        cpu = [r["server_cpu_us_per_request"] for r in runs if "server_cpu_us_per_request" in r]
        if cpu:
            out[name]["server_cpu_us_per_request"] = round(statistics.median(cpu), 1)
            out[name]["per_core_rps"] = round(1e6 / statistics.median(cpu))
            out[name]["server_cpu_share"] = round(statistics.median(r["server_cpu_share"] for r in runs), 3)
        if name != "bare":
            ratios = [r[name]["rps"] / r["bare"]["rps"] for r in per_round]
            out[name]["ratio_to_bare"] = round(statistics.median(ratios), 3)
            out[name]["ratio_by_round"] = [round(x, 3) for x in ratios]
            if cpu and "per_core_rps" in out["bare"]:
                out[name]["cpu_ratio_to_bare"] = round(out[name]["per_core_rps"] / out["bare"]["per_core_rps"], 3)
    return out
