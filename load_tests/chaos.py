"""Fault injection: ``python -m load_tests.chaos [--nodes N] [--jobs M] [--duration S] [--out DIR] [--hosts]``.

Starts a real stack on this machine (a persisted Valkey, a gateway under Hypercorn, N ``cyxwiz node``
runtimes), submits M training jobs, and while they run: SIGKILLs node runtimes at random (restarting
some, starting fresh ones for others), SIGKILLs and restarts the gateway, and SIGKILLs and restarts
the Valkey server once (which forgets the nodes' store users: nodes report it in their heartbeats
and the gateway recreates them). With ``--hosts`` the node runtimes run on a second host: a network
namespace joined by a veth pair (root only), so they reach the gateway and the store over that link.
Then it waits for every job to end and checks:

- every job is terminal, and completed (the chaos jobs get max_attempts 10, so none should fail);
- exactly one completion per job, and no report of any attempt after it;
- every completed job's weights download and load into the model its spec describes;
- no attempt resumed from before the last checkpoint an earlier run reported as stored;
- reassignments, and detection time (kill -> the killed node's jobs assigned elsewhere).

It prints a verdict and writes ``summary.json`` under DIR; exit 0 on pass, 1 on fail.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from cyxwiz.embedded import EmbeddedValkey, free_port
from cyxwiz.server import install_credentials_at, kill_group, wait_healthy
from load_tests import servers
from load_tests.netns import HostPair, host_pair, unavailable_reason
from shared import auth, keys

REPO = Path(__file__).resolve().parents[1]

CHAOS_SPEC: dict[str, Any] = {
    "name": "chaos-digits",
    "model": {"type": "mlp", "hidden": [128, 64], "activation": "gelu", "norm": "layernorm"},
    "dataset": {"name": "digits", "val_fraction": 0.2},
    "training": {"epochs": 12, "batch_size": 32, "learning_rate": 0.002, "seed": 0,
                 "progress_every_steps": 10, "checkpoint": {"enabled": True, "min_interval_s": 0.2}},
    "max_attempts": 10,
}


@dataclass
class Kill:
    what: str
    at: float
    node_id: str | None = None
    jobs: list[str] = field(default_factory=list)
    restarted_same: bool = False  # the same runtime came back (resuming as the same node)
    detected_after_s: dict[str, float] = field(default_factory=dict)    # the job left the dead node
    reassigned_after_s: dict[str, float] = field(default_factory=dict)  # ... and runs on another one


class Stack:
    """The processes under test, each one killable and restartable."""

    def __init__(self, workdir: Path, interval_s: float, ttl_s: float, hosts: HostPair | None = None) -> None:
        self.workdir = workdir
        self.hosts = hosts  # nodes on a second host: the servers listen on this host's end of the link
        self.host = hosts.host_ip if hosts else "127.0.0.1"
        self.valkey = EmbeddedValkey(workdir, persist=True, host=self.host)
        self.port = free_port()
        self.api = f"http://{self.host}:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CYXWIZ_")} | {
            "CYXWIZ_HEARTBEAT_INTERVAL_S": str(interval_s), "CYXWIZ_TTL_S": str(ttl_s),
            "CYXWIZ_DATA_DIR": str(workdir / "home"), "PYTHONUNBUFFERED": "1"} | servers.BENCH_LIMITS
        self.gateway: subprocess.Popen[bytes] | None = None
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.admin_key = auth.new_token("cwk")
        self.join_token = auth.new_token("cwj")
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        self.valkey.start()
        self.env["CYXWIZ_REDIS_URL"] = self.valkey.gateway_url  # the gateway's own store user
        install_credentials_at(self.valkey.url, self.admin_key, self.join_token)
        self.start_gateway()

    def start_gateway(self) -> None:
        log = open(self.logs / "gateway.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.gateway = subprocess.Popen(
            [sys.executable, "-m", "hypercorn", "functions.gateway:app", "--bind", f"{self.host}:{self.port}"],
            env=self.env, cwd=REPO, stdout=log, stderr=log, start_new_session=True)
        if not wait_healthy(self.api, 30):
            raise RuntimeError("gateway did not come up")

    def kill_gateway(self) -> None:
        assert self.gateway is not None
        os.killpg(self.gateway.pid, signal.SIGKILL)  # master and workers, as a machine crash would
        self.gateway.wait()

    def start_node(self, name: str) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115
        # the API URL and the join token alone: registration hands the node its store URL
        command = [sys.executable, "-m", "cyxwiz.cli", "node", "--api", self.api, "--slots", "1", "--name", name]
        env = {k: v for k, v in self.env.items() if k != "CYXWIZ_REDIS_URL"} | {"CYXWIZ_JOIN_TOKEN": self.join_token}
        self.nodes[name] = subprocess.Popen(self.hosts.command(command) if self.hosts else command,
                                            env=env, cwd=REPO, stdout=log, stderr=log)

    def kill_node(self, name: str) -> None:
        proc = self.nodes.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for name in list(self.nodes):
            proc = self.nodes.pop(name)
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.gateway is not None:
            self.gateway.terminate()
            self.gateway.wait(10)
            kill_group(self.gateway)
        self.valkey.stop()


def submit_all(http: httpx.Client, stack: Stack, count: int) -> list[str]:
    """Submit with idempotency keys, retrying through outages: each job is created exactly once."""
    job_ids = []
    for _ in range(count):
        idem = uuid.uuid4().hex
        while True:
            try:
                resp = http.post("/v1/jobs", json=CHAOS_SPEC, headers={
                    "Authorization": f"Bearer {stack.admin_key}", "Idempotency-Key": idem})
                if resp.status_code in (200, 201):
                    job_ids.append(resp.json()["job_id"])
                    break
                if resp.status_code < 500:
                    raise RuntimeError(f"submit refused: {resp.status_code} {resp.text}")
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    return job_ids


def node_id_of(client: redis.Redis, name: str) -> str | None:
    for node_id, node_name in client.hgetall(keys.NODE_NAMES).items():
        if node_name == name:
            return str(node_id)
    return None


def job_states(http: httpx.Client, stack: Stack, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    states = {}
    for job_id in job_ids:
        try:
            resp = http.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {stack.admin_key}"})
            if resp.status_code == 200:
                states[job_id] = resp.json()
        except httpx.HTTPError:
            pass
    return states


def run(nodes: int, jobs: int, duration: float, out: Path, seed: int, interval_s: float,
        ttl_s: float, hosts: bool = False) -> dict[str, Any]:
    if not hosts:
        return _run(nodes, jobs, duration, out, seed, interval_s, ttl_s, None)
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"chaos --hosts: {reason}")
    with host_pair("chaos") as pair:
        return _run(nodes, jobs, duration, out, seed, interval_s, ttl_s, pair)


def _run(nodes: int, jobs: int, duration: float, out: Path, seed: int, interval_s: float,
         ttl_s: float, hosts: HostPair | None) -> dict[str, Any]:
    rng = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix="cyxwiz-chaos-"))
    stack = Stack(workdir, interval_s, ttl_s, hosts)
    kills: list[Kill] = []
    started = time.monotonic()
    stack.start()
    client = redis.Redis.from_url(stack.valkey.url, decode_responses=True, socket_timeout=2)
    serial = 0
    try:
        for _ in range(nodes):
            serial += 1
            stack.start_node(f"chaos-{serial}")
        http = httpx.Client(base_url=stack.api, timeout=10)
        job_ids = submit_all(http, stack, jobs)
        schedule = sorted(rng.uniform(0.15, 0.9) * duration for _ in range(max(2, nodes)))
        gateway_at, redis_at = rng.uniform(0.2, 0.5) * duration, rng.uniform(0.5, 0.8) * duration
        events = [(t, "node") for t in schedule] + [(gateway_at, "gateway"), (redis_at, "redis")]
        t0 = time.monotonic()
        for at, what in sorted(events):
            while time.monotonic() - t0 < at:  # watch the earlier kills' jobs while waiting
                observe(http, stack, job_ids, kills)
                time.sleep(0.25)
            if what == "node" and stack.nodes:
                name = rng.choice(sorted(stack.nodes))
                kill = Kill("node", time.monotonic())
                try:
                    kill.node_id = node_id_of(client, name)
                    kill.jobs = sorted(client.smembers(keys.node_jobs_key(kill.node_id))) if kill.node_id else []
                except redis.RedisError:
                    pass
                stack.kill_node(name)
                kills.append(kill)
                serial += 1
                # half the time the same host comes back (and resumes as the same node), else a fresh one
                replacement = name if rng.random() < 0.5 else f"chaos-{serial}"
                kill.restarted_same = replacement == name
                stack.start_node(replacement)
            elif what == "gateway":
                kills.append(Kill("gateway", time.monotonic()))
                stack.kill_gateway()
                time.sleep(1.0)
                stack.start_gateway()
            elif what == "redis":
                kills.append(Kill("redis", time.monotonic()))
                stack.valkey.kill()
                time.sleep(1.0)
                stack.valkey.start()
        deadline = time.monotonic() + max(240.0, duration * 3)
        while time.monotonic() < deadline:
            if observe(http, stack, job_ids, kills):
                break
            time.sleep(0.25)
        summary = check(http, stack, job_ids, kills)
    finally:
        client.close()
        stack.stop()
    summary.update(nodes=nodes, jobs=jobs, duration_s=duration, seed=seed, interval_s=interval_s, ttl_s=ttl_s,
                   hosts=f"nodes in network namespace {hosts.netns} at {hosts.node_ip}" if hosts else "one",
                   wall_s=round(time.monotonic() - started, 1), workdir=str(workdir))
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def observe(http: httpx.Client, stack: Stack, job_ids: list[str], kills: list[Kill]) -> bool:
    """Note when each killed node's jobs left it (detection: requeued or placed elsewhere) and when they
    were assigned to another node (reassignment). A runtime that came back within its TTL resumes as
    the same node and keeps its jobs: nothing is detected for it. True once every job has ended."""
    states = job_states(http, stack, job_ids)
    now = time.monotonic()
    for kill in kills:
        if kill.what != "node":
            continue
        for job_id in kill.jobs:
            state = states.get(job_id)
            if not state:
                continue
            if state["node_id"] == kill.node_id:
                continue
            kill.detected_after_s.setdefault(job_id, round(now - kill.at, 2))
            if state["node_id"] is not None:
                kill.reassigned_after_s.setdefault(job_id, round(now - kill.at, 2))
    return len(states) == len(job_ids) and all(s["status"] in ("completed", "failed", "cancelled")
                                               for s in states.values())


def check(http: httpx.Client, stack: Stack, job_ids: list[str], kills: list[Kill]) -> dict[str, Any]:
    from node_runtime.training import load_trained_model

    auth_header = {"Authorization": f"Bearer {stack.admin_key}"}
    problems: list[str] = []
    states = job_states(http, stack, job_ids)
    statuses: dict[str, int] = {}
    reassignments = 0
    for job_id in job_ids:
        job = states.get(job_id)
        if job is None:
            problems.append(f"{job_id}: lost (not readable)")
            continue
        statuses[job["status"]] = statuses.get(job["status"], 0) + 1
        reassignments += job["attempt"] - 1
        if job["status"] != "completed":
            problems.append(f"{job_id}: ended {job['status']} ({job['error']})")
        events = all_events(http, auth_header, job_id)
        completions = [e for e in events if e["status"] == "completed"]
        if job["status"] == "completed" and len(completions) != 1:
            problems.append(f"{job_id}: {len(completions)} completions")
        if completions:
            last = events.index(completions[-1])
            if any(e["attempt"] >= completions[-1]["attempt"] for e in events[last + 1:]):
                problems.append(f"{job_id}: progress after its completion")
        problems += resume_problems(job_id, events)
        if job["status"] == "completed":
            try:
                load_trained_model(download_weights(http, auth_header, job_id))
            except Exception as exc:  # any failure to load is a finding, whatever its type
                problems.append(f"{job_id}: weights do not load: {exc}")
    detection = [t for k in kills if k.what == "node" for t in k.detected_after_s.values()]
    reassignment = [t for k in kills if k.what == "node" for t in k.reassigned_after_s.values()]
    return {
        "verdict": "pass" if not problems else "fail",
        "problems": problems,
        "statuses": statuses,
        "reassignments": reassignments,
        "kills": [{"what": k.what, "node_id": k.node_id, "jobs": k.jobs, "restarted_same": k.restarted_same,
                   "detected_after_s": k.detected_after_s, "reassigned_after_s": k.reassigned_after_s}
                  for k in kills],
        "detection_s": _stats(detection),
        "reassignment_s": _stats(reassignment),
    }


def download_weights(http: httpx.Client, auth_header: dict[str, str], job_id: str) -> bytes:
    """The job's weights, retried as the contract asks while the store answers 503 or a connection
    breaks (the gateway's pooled Redis connections may still be stale from the restart)."""
    for attempt in range(5):
        try:
            resp = http.get(f"/v1/jobs/{job_id}/artifacts/model.safetensors", headers=auth_header)
            if resp.status_code != 503:
                resp.raise_for_status()
                return resp.content
        except httpx.TransportError:
            if attempt == 4:
                raise
        time.sleep(1.0)
    raise RuntimeError(f"the weights of {job_id} stayed unavailable")


def _stats(values: list[float]) -> dict[str, float | int | None]:
    return {"count": len(values), "max": max(values, default=None),
            "mean": round(sum(values) / len(values), 2) if values else None}


def all_events(http: httpx.Client, auth_header: dict[str, str], job_id: str) -> list[dict[str, Any]]:
    """Every progress event of a job, page by page (``GET /progress`` answers at most 2,000 at a time)."""
    events: list[dict[str, Any]] = []
    params = {"limit": "2000"}
    while True:
        page = http.get(f"/v1/jobs/{job_id}/progress", params=params, headers=auth_header).json()
        events.extend(page["events"])
        if not page.get("next_cursor"):
            return events
        params = {"limit": "2000", "after": page["next_cursor"]}


def resume_problems(job_id: str, events: list[dict[str, Any]]) -> list[str]:
    """A run of a job (an attempt, or the same attempt after its node restarted) must resume at or after
    the last checkpoint that earlier runs reported as stored. Runs are told apart by their attempt and
    the step they resumed from, which every report of a run carries."""
    problems: list[str] = []
    earlier_checkpoint = 0  # the latest checkpoint stored by the runs before the current one
    this_run_checkpoint = 0
    run: tuple[int, int] | None = None
    for event in events:  # oldest first
        metrics = event.get("metrics") or {}
        if "resumed_from_step" not in metrics:
            continue  # a run's first report, sent before it has looked for a checkpoint
        key = (event["attempt"], int(metrics["resumed_from_step"]))
        if key != run:
            earlier_checkpoint = max(earlier_checkpoint, this_run_checkpoint)
            this_run_checkpoint = 0
            run = key
            if key[1] < earlier_checkpoint:
                problems.append(f"{job_id}: attempt {key[0]} resumed from step {key[1]}, "
                                f"but step {earlier_checkpoint} had been checkpointed")
        this_run_checkpoint = max(this_run_checkpoint, int(metrics.get("checkpoint_step") or 0))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of fault injection")
    parser.add_argument("--out", type=Path, default=Path("results/chaos"))
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--interval", type=float, default=1.0, help="heartbeat interval of the stack (s)")
    parser.add_argument("--ttl", type=float, default=3.0, help="node TTL of the stack (s)")
    parser.add_argument("--hosts", action="store_true",
                        help="run the nodes on a second host: a network namespace over a veth pair (root)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))  # run the clean-up in finally
    summary = run(args.nodes, args.jobs, args.duration, args.out, args.seed, args.interval, args.ttl, args.hosts)
    print(json.dumps({k: v for k, v in summary.items() if k != "kills"}, indent=2))
    print(f"chaos verdict: {summary['verdict'].upper()}")
    return 0 if summary["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
