"""Helpers for node runtime tests: real ``python -m node_runtime`` processes against the session's
Valkey and gateway, and small waits over the HTTP API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx

from cyxwiz.embedded import free_port
from cyxwiz.server import install_credentials_at, wait_healthy
from tests.conftest import DIGITS_SPEC, REPO, TEST_ENV, bearer

T = TypeVar("T")


def long_digits(epochs: int = 300, name: str = "long-digits") -> dict[str, Any]:
    """A digits job that runs for tens of seconds, reports every few steps and checkpoints often."""
    spec = {**DIGITS_SPEC, "name": name}
    spec["training"] = {**DIGITS_SPEC["training"], "epochs": epochs, "progress_every_steps": 5,
                        "checkpoint": {"min_interval_s": 0.5}}
    return spec


class NodeProcess:
    """One node runtime process, its output in a log file."""

    def __init__(self, api_url: str, join_token: str, log_path: Path, *, slots: int = 1,
                 name: str = "test-node", extra_args: list[str] | None = None,
                 extra_env: dict[str, str] | None = None, netns: str | None = None,
                 own_group: bool = False) -> None:
        self.log_path = log_path
        self.own_group = own_group  # a session and process group of its own, as systemd or a terminal gives it
        # no store URL: registration hands the node its own; the join token through the environment
        self.command = [*(["ip", "netns", "exec", netns] if netns else []),
                        sys.executable, "-m", "node_runtime", "--api", api_url, "--slots", str(slots),
                        "--name", name, "--torch-threads", "1", *(extra_args or [])]
        # a data dir of the test's own unless given: never ~/.cyxwiz, where another test run on the same
        # host would hold the same node name's lock
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "CYXWIZ_JOIN_TOKEN": join_token,
                    "CYXWIZ_DATA_DIR": str(log_path.parent / "data"), **(extra_env or {})}
        self.env.pop("CYXWIZ_REDIS_URL", None)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> NodeProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, cwd=REPO, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=self.own_group)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def signal_group(self, signum: int) -> None:
        """Signal every process of the runtime's group (runtime, forkserver, job processes), as
        ``systemctl stop`` or Ctrl-C in a terminal does; only for a node started with ``own_group``."""
        assert self.process is not None and self.own_group
        os.killpg(self.pid, signum)

    def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout_s)

    def descendant_pids(self) -> list[int]:
        """Pids of the runtime's children and theirs (job processes, the forkserver, multiprocessing's
        resource tracker)."""
        found, todo = [], [self.pid]
        while todo:
            found += (children := child_pids(todo.pop()))
            todo += children
        return found

    def forkserver_pid(self) -> int | None:
        """The runtime's forkserver (warm job processes), once it has started."""
        servers = [pid for pid in child_pids(self.pid) if b"forkserver" in _cmdline(pid)]
        return servers[0] if servers else None

    def job_process_pids(self) -> list[int]:
        """Pids of the runtime's job processes: spawned children, or the forkserver's forked ones."""
        found = [pid for pid in child_pids(self.pid) if b"spawn_main" in _cmdline(pid)]
        server = self.forkserver_pid()
        return found + (child_pids(server) if server is not None else [])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; its job processes follow it."""
        if self.process is None or self.process.poll() is not None:
            return
        children = self.descendant_pids()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def child_pids(pid: int) -> list[int]:
    """The children of every thread of ``pid`` (the runtime starts processes from worker threads)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def wait_until(check: Callable[[], T | Literal[False] | None], timeout_s: float, interval_s: float = 0.1,
               what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class Api:
    """The user's side of the HTTP API (admin key)."""

    def __init__(self, http: httpx.Client, api_key: str) -> None:
        self.http, self.headers = http, bearer(api_key)

    def submit(self, spec: dict[str, Any]) -> str:
        resp = self.http.post("/v1/jobs", json=spec, headers=self.headers)
        assert resp.status_code == 201, resp.text
        return str(resp.json()["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        resp = self.http.get(f"/v1/jobs/{job_id}", headers=self.headers)
        assert resp.status_code == 200, resp.text
        return resp.json()  # type: ignore[no-any-return]

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """Every progress event of the job, page by page."""
        events: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params = {"limit": "2000", **({"after": cursor} if cursor else {})}
            resp = self.http.get(f"/v1/jobs/{job_id}/progress", params=params, headers=self.headers)
            assert resp.status_code == 200, resp.text
            page = resp.json()
            events.extend(page["events"])
            cursor = page["next_cursor"]
            if not cursor:
                return events

    def nodes(self) -> list[dict[str, Any]]:
        return self.http.get("/v1/nodes", headers=self.headers).json()["nodes"]  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> None:
        resp = self.http.post(f"/v1/jobs/{job_id}/cancel", headers=self.headers)
        assert resp.status_code == 202, resp.text

    def artifact(self, job_id: str, name: str = "model.safetensors") -> bytes:
        resp = self.http.get(f"/v1/jobs/{job_id}/artifacts/{name}", headers=self.headers)
        assert resp.status_code == 200, resp.text
        return resp.content

    def wait_status(self, job_id: str, statuses: tuple[str, ...], timeout_s: float) -> dict[str, Any]:
        """The job once its status is one of ``statuses``. A 503 (the store restarting: pooled
        connections fail once each) is waited out, as any client honouring Retry-After would."""
        def reached() -> dict[str, Any] | None:
            resp = self.http.get(f"/v1/jobs/{job_id}", headers=self.headers)
            if resp.status_code == 503:
                return None
            assert resp.status_code == 200, resp.text
            job: dict[str, Any] = resp.json()
            return job if job["status"] in statuses else None

        return wait_until(reached, timeout_s, what=f"job {job_id} to be {' or '.join(statuses)}")

    def wait_progress(self, job_id: str, min_step: int, timeout_s: float) -> dict[str, Any]:
        """The job once it is running and has reported at least ``min_step`` steps."""
        def reached() -> dict[str, Any] | None:
            job = self.job(job_id)
            assert job["status"] not in ("completed", "failed", "cancelled"), job
            step = (job.get("progress") or {}).get("step") or 0
            return job if job["status"] == "running" and step >= min_step else None

        return wait_until(reached, timeout_s, what=f"job {job_id} to reach step {min_step}")

    def wait_nodes(self, count: int, timeout_s: float = 30) -> list[dict[str, Any]]:
        return wait_until(lambda: len(nodes := [n for n in self.nodes() if n["status"] == "online"]) >= count
                          and nodes, timeout_s, what=f"{count} online node(s)")


def start_gateway_on(port: int, redis_url: str) -> subprocess.Popen[bytes]:
    """A gateway on a fixed port (so it can be stopped and started again at the same URL)."""
    env = {**os.environ, **TEST_ENV, "CYXWIZ_REDIS_URL": redis_url}
    return subprocess.Popen([sys.executable, "-m", "hypercorn", "functions.gateway:app", "--bind",
                             f"127.0.0.1:{port}", "--workers", "1"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def install_credentials(redis_url: str) -> tuple[str, str]:
    """A fresh admin key and join token in the store at ``redis_url``."""
    from shared import auth

    admin_key, join_token = auth.new_token("cwk"), auth.new_token("cwj")
    install_credentials_at(redis_url, admin_key, join_token)
    return admin_key, join_token


@contextmanager
def serve_on(host_ip: str, tmp_path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """`cyxwiz serve` listening on ``host_ip`` (the host side of a veth pair), its data in
    ``tmp_path/server`` and its output in ``tmp_path/serve.log``: yields its API URL and credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYXWIZ_")} | TEST_ENV | {
        "CYXWIZ_DATA_DIR": str(tmp_path / "server")}
    api_url = f"http://{host_ip}:{free_port()}"
    with open(tmp_path / "serve.log", "ab") as log:
        serve = subprocess.Popen([sys.executable, "-m", "cyxwiz.cli", "serve", "--host", host_ip, "--port",
                                  api_url.rsplit(":", 1)[1]], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_healthy(api_url, 30), (tmp_path / "serve.log").read_text()
        yield api_url, json.loads((tmp_path / "server" / "credentials.json").read_text())
    finally:
        serve.terminate()
        serve.wait(30)


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
