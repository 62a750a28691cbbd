"""`cyxwiz serve` supervises its children: a killed embedded Valkey or gateway comes back by itself,
and no acknowledged job is lost (append-only file, fsync always)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

from cyxwiz.embedded import free_port
from cyxwiz.server import wait_healthy
from tests.conftest import DIGITS_SPEC, REPO, bearer


def wait_for(predicate, timeout_s: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except (httpx.HTTPError, redis.RedisError):
            pass
        time.sleep(0.1)
    return False


def test_serve_restarts_killed_children_and_keeps_jobs() -> None:
    data_dir = tempfile.mkdtemp(prefix="cyxwiz-serve-")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYXWIZ_")} | {"CYXWIZ_DATA_DIR": data_dir}
    server = subprocess.Popen([sys.executable, "-m", "cyxwiz.cli", "serve", "--port", str(port)], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}"
    try:
        assert wait_healthy(api, 30)
        creds = json.loads((Path(data_dir) / "credentials.json").read_text())
        key = bearer(creds["api_key"])
        job_ids = [httpx.post(f"{api}/v1/jobs", json=DIGITS_SPEC, headers=key).json()["job_id"] for _ in range(20)]

        store = redis.Redis.from_url(creds["redis_url"])
        valkey_pid = int(store.info("server")["process_id"])
        store.close()
        os.kill(valkey_pid, signal.SIGKILL)  # a crash: every acknowledged job must be in the AOF
        assert wait_for(lambda: httpx.get(f"{api}/healthz").status_code == 200)
        for job_id in job_ids:
            assert httpx.get(f"{api}/v1/jobs/{job_id}", headers=key).json()["status"] == "queued"

        pattern = f"hypercorn functions.gateway:app --bind 127.0.0.1:{port}"
        gateway_pid = int(subprocess.check_output(["pgrep", "-f", pattern], text=True).split()[0])
        os.kill(gateway_pid, signal.SIGKILL)
        assert wait_for(lambda: httpx.get(f"{api}/v1/jobs/{job_ids[0]}", headers=key).status_code == 200)
    finally:
        server.terminate()
        assert server.wait(30) == 0
