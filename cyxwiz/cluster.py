"""``cyxwiz node``, ``cyxwiz up`` and ``cyxwiz demo``: the node runtime and a one-machine cluster.

``up`` and ``demo`` run ``cyxwiz serve`` and the node runtimes as child processes, each in its own
session, so that Ctrl-C reaches only this process, which then stops them in order: the nodes first
(they drain: checkpoint, hand jobs back, deregister, which needs the API), the server last.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from cyxwiz.credentials import read_credentials
from cyxwiz.embedded import free_port, local_address, port_is_free
from cyxwiz.server import wait_healthy
from shared.jobspec import DIGITS_MLP_EXAMPLE
from shared.settings import default_data_dir

STOP_TIMEOUT_S = 60.0


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register node, up and demo on the CLI's sub-command parser."""
    from node_runtime.settings import add_node_arguments

    p = sub.add_parser("node", help="a node runtime: trains the jobs the control plane places on this host")
    add_node_arguments(p)
    p.set_defaults(handler=cmd_node)

    p = sub.add_parser("up", help="serve plus N local node runtimes: a whole cluster on one machine")
    p.add_argument("--nodes", type=int, default=1, help="node runtimes to start (default 1)")
    p.add_argument("--slots", type=int, default=1, help="slots of each node runtime (default 1)")
    p.add_argument("--host", default="127.0.0.1", help="address the gateway and the embedded store listen on")
    p.add_argument("--port", type=int, default=8080, help="the API's port")
    p.add_argument("--data-dir", help="default: $CYXWIZ_DATA_DIR or ~/.cyxwiz")
    p.set_defaults(handler=cmd_up)

    p = sub.add_parser("demo", help="start a cluster, train a digits MLP with a live progress bar, shut down")
    p.add_argument("--data-dir", help="state of the demo cluster (default: a temporary directory, removed after)")
    p.add_argument("--port", type=int, help="API port (default: a free one)")
    p.add_argument("-o", "--output", default="cyxwiz-demo-model.safetensors",
                   help="where the trained weights go (default: ./cyxwiz-demo-model.safetensors)")
    p.set_defaults(handler=cmd_demo)


def cmd_node(args: argparse.Namespace) -> int:
    from node_runtime.settings import run_node_from_args

    return run_node_from_args(args)


class LocalCluster:
    """``cyxwiz serve`` plus node runtimes on this machine, as child processes in their own sessions."""

    def __init__(self, data_dir: Path, port: int, nodes: int, slots: int, host: str = "127.0.0.1",
                 quiet: bool = False) -> None:
        self.data_dir, self.port, self.nodes, self.slots, self.host = data_dir, port, nodes, slots, host
        self.api_url = f"http://{local_address(host, port)}"
        self.quiet = quiet
        self.server: subprocess.Popen[bytes] | None = None
        self.node_processes: list[subprocess.Popen[bytes]] = []
        self.logs = data_dir / "logs"

    def _spawn(self, command: list[str], log_name: str, extra_env: dict[str, str] | None = None
               ) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        env.pop("CYXWIZ_REDIS_URL", None)  # the cluster's own embedded store, not one from the environment
        output: Any = None
        if self.quiet:
            self.logs.mkdir(parents=True, exist_ok=True)
            output = open(self.logs / log_name, "ab")  # noqa: SIM115 - the child owns it; closed in stop()
        return subprocess.Popen(command, env=env, stdout=output, stderr=output, stdin=subprocess.DEVNULL,
                                start_new_session=True)

    def start(self) -> None:
        """Start the server, wait until it is healthy, then start the node runtimes."""
        if not port_is_free(self.port, self.host):
            raise RuntimeError(f"port {self.port} is in use (another `cyxwiz serve` or `up`?); pass --port")
        self.server = self._spawn([sys.executable, "-m", "cyxwiz.cli", "serve", "--host", self.host, "--port",
                                   str(self.port), "--data-dir", str(self.data_dir)], "serve.log")
        if not wait_healthy(self.api_url, 60):
            raise RuntimeError(f"the server did not become healthy at {self.api_url}"
                               + (f"; see {self.logs / 'serve.log'}" if self.quiet else ""))
        creds = read_credentials(self.data_dir)
        cores = os.cpu_count() or 1
        threads = max(1, (cores - (1 if cores <= 8 else 0)) // max(1, self.nodes * self.slots))
        for index in range(self.nodes):
            # the join token through the environment, never on a command line (`ps` shows those);
            # no store URL at all: registration hands each node one for its own stream
            command = [sys.executable, "-m", "node_runtime", "--api", self.api_url, "--slots", str(self.slots),
                       "--name", f"local-{index + 1}", "--torch-threads", str(threads),
                       "--data-dir", str(self.data_dir)]
            self.node_processes.append(self._spawn(command, f"node-{index + 1}.log",
                                                   {"CYXWIZ_JOIN_TOKEN": creds["join_token"]}))

    def dead_children(self) -> list[str]:
        dead = [f"node {i + 1} (exit {p.returncode})" for i, p in enumerate(self.node_processes)
                if p.poll() is not None]
        if self.server is not None and self.server.poll() is not None:
            dead.append(f"server (exit {self.server.returncode})")
        return dead

    def wait_nodes_registered(self, client: Any, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            nodes = client.request("GET", "/v1/nodes")["nodes"]
            if sum(1 for node in nodes if node["status"] == "online") >= self.nodes:
                return True
            if self.dead_children():
                return False
            time.sleep(0.2)
        return False

    def stop(self) -> bool:
        """Drain the node runtimes, then stop the server; True if every child exited cleanly."""
        clean = True
        for process in self.node_processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.node_processes:
            clean &= _wait_or_kill(process)
        if self.server is not None:
            if self.server.poll() is None:
                self.server.send_signal(signal.SIGTERM)
            clean &= _wait_or_kill(self.server)
        for process in [*self.node_processes, *([self.server] if self.server else [])]:
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        return clean


def _wait_or_kill(process: subprocess.Popen[bytes]) -> bool:
    try:
        return process.wait(STOP_TIMEOUT_S) == 0
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return False


@contextmanager
def _stop_on_signals() -> Iterator[list[int]]:
    """SIGTERM and SIGINT end the ``with`` body by KeyboardInterrupt; the list records which came."""
    received: list[int] = []

    def interrupt(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def cmd_up(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    cluster = LocalCluster(data_dir, args.port, args.nodes, args.slots, host=args.host)
    code = 0
    with _stop_on_signals():
        try:
            cluster.start()
            print(f"cyxwiz: cluster up: API {cluster.api_url}, {args.nodes} node(s) x {args.slots} slot(s); "
                  f"credentials in {data_dir / 'credentials.json'}. Ctrl-C stops it.", flush=True)
            while not (dead := cluster.dead_children()):
                time.sleep(0.5)
            print(f"cyxwiz: stopping: {', '.join(dead)} exited", file=sys.stderr, flush=True)
            code = 1
        except KeyboardInterrupt:
            print("cyxwiz: stopping the cluster (nodes hand their jobs back first)", flush=True)
        except RuntimeError as exc:
            print(f"cyxwiz: {exc}", file=sys.stderr)
            code = 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave children behind
    try:
        clean = cluster.stop()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    return code if clean else 1


def cmd_demo(args: argparse.Namespace) -> int:
    temporary = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="cyxwiz-demo-")) if temporary else Path(args.data_dir).expanduser()
    cluster = LocalCluster(data_dir, args.port or free_port(), nodes=1, slots=1, quiet=True)
    code = 1
    with _stop_on_signals():
        try:
            code = run_demo(cluster, Path(args.output), DIGITS_MLP_EXAMPLE)
        except KeyboardInterrupt:
            print("\ncyxwiz: interrupted; shutting the demo cluster down", flush=True)
            code = 130
        except RuntimeError as exc:
            print(f"cyxwiz: {exc}", file=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        clean = cluster.stop()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    print("cyxwiz: demo cluster stopped" + ("" if clean else " (some processes had to be killed)"), flush=True)
    if temporary:
        shutil.rmtree(data_dir, ignore_errors=True)
    return code if clean or code else 1


def run_demo(cluster: LocalCluster, output: Path, spec: dict[str, Any]) -> int:
    """Start the cluster, train ``spec`` with a live progress bar, download and reload the weights."""
    from cyxwiz.cli import printable, watch_job
    from cyxwiz.client import ApiClient

    started = time.monotonic()
    print(f"cyxwiz demo: starting a server and one node runtime (state in {cluster.data_dir})", flush=True)
    cluster.start()
    client = ApiClient(cluster.api_url, read_credentials(cluster.data_dir)["api_key"])
    if not cluster.wait_nodes_registered(client):
        raise RuntimeError(f"the node runtime did not register; see {cluster.logs}")
    job = client.request("POST", "/v1/jobs", spec)
    model, training = spec["model"], spec["training"]
    print(f"cyxwiz demo: submitted job {job['job_id']}: an MLP {model['hidden']} on 8x8 handwritten digits, "
          f"{training['epochs']} epochs ({time.monotonic() - started:.1f} s after start)", flush=True)
    job = watch_job(client, job["job_id"], interval_s=0.25)
    if job["status"] != "completed":
        print(f"cyxwiz demo: the job ended {job['status']}: {printable(job.get('error'), multiline=True)}",
              file=sys.stderr)
        return 1
    metrics = job["progress"]["metrics"]
    print(f"cyxwiz demo: trained in {_seconds_between(job['started_at'], job['finished_at']):.1f} s: "
          f"validation accuracy {metrics['val_accuracy']:.4f}, validation loss {metrics['val_loss']:.4f}")
    weights = client.request("GET", f"/v1/jobs/{job['job_id']}/artifacts/model.safetensors", raw=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(weights)
    parameters, accuracy = _reload_and_score(output, job["spec"])
    print(f"cyxwiz demo: weights downloaded to {output.resolve()} ({len(weights)} bytes); they load into the "
          f"model ({parameters} parameters), which scores {accuracy:.4f} on the validation split")
    print(f"cyxwiz demo: done in {time.monotonic() - started:.1f} s; shutting down", flush=True)
    return 0


def _seconds_between(start: str | None, end: str | None) -> float:
    from datetime import datetime

    if not start or not end:
        return 0.0
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _reload_and_score(path: Path, spec: dict[str, Any]) -> tuple[int, float]:
    """Load the downloaded weights with ``load_trained_model`` and score them on the validation split."""
    import torch

    from node_runtime.training import load_trained_model
    from node_runtime.training.datasets import load_dataset

    model = load_trained_model(path)
    correct = total = 0
    with torch.no_grad():
        for inputs, targets in load_dataset(spec).val_batches(1024):
            correct += int((model(inputs).argmax(-1) == targets).sum())
            total += len(targets)
    return sum(p.numel() for p in model.parameters()), correct / max(1, total)
