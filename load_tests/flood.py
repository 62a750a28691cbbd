"""Slow-body flood: ``python -m load_tests.flood [--connections N] [--duration S] [--out DIR]``.

Starts a local stack (``cyxwiz serve``, :mod:`load_tests.stack`), registers a node and heartbeats it
from 127.0.0.1 while N unauthenticated connections each declare a 1 MB body and send one byte of it
every few seconds (the attack that once held every descriptor of the gateway and got a live node
reaped). Three phases of S seconds each, side by side in one run:

1. baseline: heartbeats only;
2. one address: the N connections all come from 127.0.0.2 (the per-address cap decides);
3. many addresses: the N connections spread over 127.0.0.2 .. 127.0.0.21 (the total cap, its
   reserve and the body deadline decide).

It prints heartbeat latency p50/p99 of each phase and its ratio to the baseline, what the attacking
connections got (503 overloaded, the 401 of a request without a token once its body timed out, ...),
and whether the node stayed registered; and writes ``flood-<UTC time>.json`` under DIR (default
load_tests/results). The stack runs with a 1 s heartbeat interval and a 3 s TTL, so a node starved of
heartbeats for 3 s is reaped: exit status 1 if the node lost its registration, else 0. The edge's
limits are the production defaults unless ``CYXWIZ_*`` variables in the environment say otherwise.
Heartbeats open a new connection each (as a node's do at the 10 s interval): accepting is measured too.
The attackers run in processes of their own (``--processes``, default one per 8,000 connections: each
process has its own descriptor limit). Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import sys
import threading
import time
from collections import Counter
from typing import Any

import httpx

from load_tests.machine import machine_info, write_results
from load_tests.stack import LocalStack
from shared.settings import Settings

STACK_ENV = {"CYXWIZ_HEARTBEAT_INTERVAL_S": "1", "CYXWIZ_TTL_S": "3"}
DECLARED_BODY = 1_000_000
MANY_ADDRESSES = 20
CONNECT_RATE_PER_S = 2000  # new attacking connections per second while ramping up


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m load_tests.flood", description=__doc__.split("\n")[0])
    p.add_argument("--connections", type=int, default=5000, help="attacking connections (default 5000)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds measured per phase (default 20)")
    p.add_argument("--drip-s", type=float, default=3.0, help="one body byte per connection this often (default 3)")
    p.add_argument("--reconnect-s", type=float, default=3.0,
                   help="an attacking connection that was answered or closed comes back after this long (default 3)")
    p.add_argument("--processes", type=int, default=0,
                   help="attacking processes (default: one per 8,000 connections; each has its own descriptors)")
    p.add_argument("--heartbeat-every-s", type=float, default=0.2, help="the measuring node's heartbeat period")
    p.add_argument("--ttl", type=float, default=3.0,
                   help="the node TTL of the stack (default 3 s; production's is 30 s), heartbeat interval TTL/3")
    p.add_argument("--out", default="load_tests/results", help="results directory (default load_tests/results)")
    return p.parse_args(argv)


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (every attacking connection is a descriptor); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def placement() -> dict[str, str | None]:
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"server": "0", "load": "1"} if count >= 2 else {"server": None, "load": None}


# --- the attackers (a process of their own, so their event loop does not delay the measurements) ---


def attack(host: str, port: int, sources: list[str], connections: int, drip_s: float, reconnect_s: float,
           stop_at: float, cpus: str | None, results: Any) -> None:
    """Run the slow-body connections until ``stop_at`` (time.time()); put their tallies on ``results``."""
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    results.put(asyncio.run(_attack(host, port, sources, connections, drip_s, reconnect_s, stop_at)))


async def _attack(host: str, port: int, sources: list[str], connections: int, drip_s: float, reconnect_s: float,
                  stop_at: float) -> dict[str, Any]:
    outcomes: Counter[str] = Counter()
    gauge = {"open": 0, "peak": 0, "connected_once": 0}
    head = (f"POST /v1/nodes HTTP/1.1\r\nHost: flood\r\nContent-Type: application/json\r\n"
            f"Content-Length: {DECLARED_BODY}\r\n\r\n{{").encode()

    async def slot(index: int) -> None:
        await asyncio.sleep(index / CONNECT_RATE_PER_S)
        first = True
        while time.time() < stop_at:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, local_addr=(sources[index % len(sources)], 0)), 10)
            except (OSError, TimeoutError):
                outcomes["connect_error"] += 1
                await asyncio.sleep(reconnect_s)
                continue
            gauge["open"] += 1
            gauge["peak"] = max(gauge["peak"], gauge["open"])
            if first:
                gauge["connected_once"] += 1
                first = False
            try:
                writer.write(head)
                outcomes[await _drip(reader, writer, drip_s, stop_at)] += 1
            except OSError:
                outcomes["reset"] += 1
            finally:
                gauge["open"] -= 1
                writer.close()
            await asyncio.sleep(reconnect_s)

    await asyncio.gather(*(slot(i) for i in range(connections)))
    return {"outcomes": dict(outcomes), "peak_open": gauge["peak"], "connected_once": gauge["connected_once"],
            "connections_made": sum(v for k, v in outcomes.items() if k != "connect_error")}


async def _drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, drip_s: float, stop_at: float) -> str:
    """Drip body bytes until the server answers or closes; the outcome's name."""
    while time.time() < stop_at:
        try:
            data = await asyncio.wait_for(reader.read(4096), drip_s)
        except TimeoutError:
            writer.write(b" ")
            await writer.drain()
            continue
        if not data:
            return "closed_without_answer"
        try:
            async with asyncio.timeout(5):
                while b'"code":"' not in data and (more := await reader.read(4096)):
                    data += more
        except (TimeoutError, OSError):
            pass
        status = data.split(b" ", 2)[1].decode(errors="replace") if data.startswith(b"HTTP/") else "garbled"
        code = b'"code":"' in data and data.split(b'"code":"', 1)[1].split(b'"', 1)[0].decode(errors="replace")
        return f"{status} {code}" if code else status
    return "still_held_at_end"


# --- the measuring node -------------------------------------------------------------------------


class Prober:
    """Heartbeats one node from a thread for the whole run, a new connection each time; each sample is
    filed under the phase running when it was sent (the node is never left without heartbeats
    between phases)."""

    def __init__(self, api_url: str, node: dict[str, Any], every_s: float) -> None:
        self.api_url, self.node, self.every_s = api_url, node, every_s
        self.phase = "setup"
        self.samples: list[tuple[str, str, float | None]] = []  # (phase, outcome, latency ms of a 200)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.node['session_token']}"}
        path = f"/v1/nodes/{self.node['node_id']}/heartbeat"
        with httpx.Client(base_url=self.api_url, timeout=10,
                          limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while not self.stopping.is_set():
                phase, began = self.phase, time.perf_counter()
                try:
                    resp = client.post(path, json={}, headers=headers)
                    took = (time.perf_counter() - began) * 1000
                    self.samples.append((phase, str(resp.status_code), took if resp.status_code == 200 else None))
                except httpx.HTTPError as exc:
                    self.samples.append((phase, type(exc).__name__, None))
                self.stopping.wait(max(0.0, self.every_s - (time.perf_counter() - began)))

    def summary(self, phase: str) -> dict[str, Any]:
        mine = [(outcome, ms) for name, outcome, ms in self.samples if name == phase]
        latencies = [ms for _, ms in mine if ms is not None]
        outcomes = Counter(outcome for outcome, _ in mine)
        return {"count": len(mine), "ok": outcomes.get("200", 0), "outcomes": dict(outcomes),
                "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
                "max_ms": round(max(latencies), 2) if latencies else None}

    def lost_registration(self) -> bool:
        """A heartbeat was refused as from an unknown node: it had been reaped."""
        return any(outcome in ("401", "404") for _, outcome, _ in self.samples)

    def __enter__(self) -> Prober:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(15)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))], 2)


def node_online(api_url: str, api_key: str, node_id: str) -> bool:
    resp = httpx.get(f"{api_url}/v1/nodes/{node_id}", headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
    return resp.status_code == 200 and resp.json().get("status") == "online"


def run_phase(name: str, stack: LocalStack, prober: Prober, sources: list[str], args: argparse.Namespace,
              cpus: str | None) -> dict[str, Any]:
    phase: dict[str, Any] = {"name": name, "sources": sources}
    procs: list[Any] = []
    results: Any = None
    if sources:
        ramp_s = 1.0 + args.connections / CONNECT_RATE_PER_S
        stop_at = time.time() + ramp_s + args.duration + 1.0
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        count = args.processes or -(-args.connections // 8000)
        for index in range(count):
            share = args.connections // count + (index < args.connections % count)
            procs.append(context.Process(target=attack, daemon=True, args=(
                "127.0.0.1", stack.port, sources, share, args.drip_s, args.reconnect_s, stop_at, cpus, results)))
        prober.phase = f"{name} (ramp)"
        for proc in procs:
            proc.start()
        time.sleep(ramp_s)
        phase["ramp_heartbeats"] = prober.summary(prober.phase)
    prober.phase = name
    time.sleep(args.duration)
    prober.phase = f"after {name}"
    phase["heartbeats"] = prober.summary(name)
    if procs:
        phase["flood"] = merge([results.get(timeout=args.duration + 120) for _ in procs])
        for proc in procs:
            proc.join(30)
    phase["node_online_after"] = node_online(stack.api_url, stack.credentials["api_key"], prober.node["node_id"])
    return phase


def merge(tallies: list[dict[str, Any]]) -> dict[str, Any]:
    """The attacking processes' tallies as one (their peaks add up: an upper bound of the peak)."""
    outcomes: Counter[str] = Counter()
    for tally in tallies:
        outcomes.update(tally["outcomes"])
    return {"outcomes": dict(outcomes), "processes": len(tallies),
            **{key: sum(t[key] for t in tallies) for key in ("peak_open", "connected_once", "connections_made")}}


def ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 2) if value is not None and base else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    fd_limit = raise_fd_limit()
    cpus = placement()
    stack_env = {**STACK_ENV, "CYXWIZ_TTL_S": f"{args.ttl:g}", "CYXWIZ_HEARTBEAT_INTERVAL_S": f"{args.ttl / 3:g}"}
    settings = Settings.from_env({**os.environ, **stack_env})
    edge = {name: getattr(settings, name) for name in ("body_timeout_s", "min_body_rate_bps", "request_timeout_s",
                                                       "max_requests_per_client", "max_requests")}
    print(f"flood: {args.connections} slow-body connections, {args.duration:g} s per phase; edge {edge}", flush=True)
    results: dict[str, Any] = {
        "command": "python -m load_tests.flood " + " ".join(sys.argv[1:] if argv is None else argv),
        "connections": args.connections, "duration_s": args.duration, "drip_s": args.drip_s,
        "reconnect_s": args.reconnect_s, "declared_body_bytes": DECLARED_BODY,
        "heartbeat_every_s": args.heartbeat_every_s, "stack_env": stack_env, "edge": edge,
        "placement": cpus, "fd_limit": fd_limit, "machine": machine_info(),
        "load_average_at_start": os.getloadavg(),  # other work on the machine moves these numbers
    }
    with LocalStack(env=stack_env, cpus=cpus["server"]) as stack:
        with httpx.Client(base_url=stack.api_url, timeout=10) as client:
            resp = client.post("/v1/nodes", json={"name": "flood-probe", "slots": 1, "capabilities": {
                "device": "cpu", "cpu_cores": 1, "ram_mb": 1024}},
                headers={"Authorization": f"Bearer {stack.credentials['join_token']}"})
            resp.raise_for_status()
            node = resp.json()
        many = [f"127.0.0.{2 + i}" for i in range(MANY_ADDRESSES)]
        phases = []
        with Prober(stack.api_url, node, args.heartbeat_every_s) as prober:
            for name, sources in (("baseline", []), ("one_address", ["127.0.0.2"]), ("many_addresses", many)):
                print(f"flood: phase {name}", flush=True)
                phases.append(run_phase(name, stack, prober, sources, args, cpus["load"]))
                time.sleep(2.0)  # the last phase's connections go; the node keeps beating
        lost = prober.lost_registration() or not all(p["node_online_after"] for p in phases)
        results["heartbeats_in_all"] = len(prober.samples)
    base = phases[0]["heartbeats"]
    for phase in phases:
        beats = phase["heartbeats"]
        phase["p50_ratio_to_baseline"] = ratio(beats["p50_ms"], base["p50_ms"])
        phase["p99_ratio_to_baseline"] = ratio(beats["p99_ms"], base["p99_ms"])
    results |= {"phases": phases, "node_registered": not lost, "load_average_at_end": os.getloadavg(),
                "wall_s": round(time.time() - started, 1)}
    path = write_results(args.out, "flood", results, at=started)
    print(f"{'phase':<15} {'beats':>6} {'ok':>6} {'p50 ms':>8} {'p99 ms':>8} {'p50 x':>6} {'p99 x':>6}  attackers got")
    for phase in phases:
        beats, flood = phase["heartbeats"], phase.get("flood") or {}
        got = ", ".join(f"{k}: {v}" for k, v in sorted(flood.get("outcomes", {}).items()))
        print(f"{phase['name']:<15} {beats['count']:>6} {beats['ok']:>6} {beats['p50_ms'] or 0:>8.1f} "
              f"{beats['p99_ms'] or 0:>8.1f} {phase['p50_ratio_to_baseline'] or 0:>6.2f} "
              f"{phase['p99_ratio_to_baseline'] or 0:>6.2f}  {got or '-'}"
              + (f" (peak {flood['peak_open']} open)" if flood else ""))
    print(f"flood: node {'stayed registered' if not lost else 'LOST its registration'}; results in {path}", flush=True)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
