"""A throwaway local stack for load runs: ``cyxwiz serve`` on a free port with a temporary data dir.

The stack is the real product (gateway under Hypercorn plus the embedded Valkey); its credentials come
from the ``credentials.json`` that ``serve`` writes, exactly as a user would find them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cyxwiz.embedded import free_port
from cyxwiz.server import wait_healthy

REPO = Path(__file__).resolve().parents[1]


def pinned(command: list[str], cpus: str | None) -> list[str]:
    """``command`` under ``taskset -c cpus`` when asked for and available (Linux), else unchanged."""
    if cpus and shutil.which("taskset"):
        return ["taskset", "-c", cpus, *command]
    return command


class LocalStack:
    """``cyxwiz serve`` as a child process; use as a context manager."""

    def __init__(self, *, env: dict[str, str] | None = None, cpus: str | None = None,
                 log_path: Path | None = None) -> None:
        self.env = env or {}
        self.cpus = cpus
        self.log_path = log_path
        self.data_dir = Path(tempfile.mkdtemp(prefix="cyxwiz-load-"))
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.credentials: dict[str, Any] = {}

    def start(self, timeout_s: float = 60.0) -> LocalStack:
        command = pinned([sys.executable, "-m", "cyxwiz.cli", "serve", "--host", "127.0.0.1", "--port",
                          str(self.port), "--data-dir", str(self.data_dir)], self.cpus)
        env = {**os.environ, **self.env}
        env.pop("CYXWIZ_REDIS_URL", None)  # the local stack always uses its own embedded store
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=log,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        creds_file = self.data_dir / "credentials.json"
        deadline = time.monotonic() + timeout_s
        while not creds_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"cyxwiz serve did not start (exit {self.process.returncode})")
            time.sleep(0.05)
        if not wait_healthy(self.api_url, max(1.0, deadline - time.monotonic())):
            self.stop()
            raise RuntimeError(f"cyxwiz serve did not become healthy at {self.api_url}")
        self.credentials = json.loads(creds_file.read_text())
        return self

    def client_env(self) -> dict[str, str]:
        """The environment a load generator needs to reach this stack as admin and as nodes."""
        return {"CYXWIZ_API_URL": self.api_url, "CYXWIZ_API_KEY": self.credentials["api_key"],
                "CYXWIZ_JOIN_TOKEN": self.credentials["join_token"],
                "CYXWIZ_REDIS_URL": self.credentials["redis_url"]}

    def stop(self) -> None:
        """SIGTERM the supervisor (it stops the gateway, then Valkey), then remove the data dir."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
