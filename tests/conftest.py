"""Test session fixtures: a real Valkey server and a real gateway under Hypercorn, started once per
session; every test starts from an empty database.

Servers run as child processes on free loopback ports; nothing is mocked. The gateway runs with a
short heartbeat interval and TTL so that lapsed-node tests finish in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from cyxwiz.embedded import EmbeddedValkey, free_port
from cyxwiz.server import install_credentials_at, wait_healthy
from shared import auth, store_users
from shared.jobspec import DIGITS_MLP_EXAMPLE

REPO = Path(__file__).resolve().parents[1]
# Short liveness settings for the whole test session (production: 10 s and 30 s).
# The per-key rate limit is raised: tests submit bursts of hundreds of jobs with one key.
TEST_ENV = {"CYXWIZ_HEARTBEAT_INTERVAL_S": "0.5", "CYXWIZ_TTL_S": "2", "CYXWIZ_COOLOFF_S": "5",
            "CYXWIZ_RATE_LIMIT_PER_S": "2000",
            # audits are tested on their own (tests/node_runtime/test_verification.py); elsewhere they would
            # hold every result for a replay on a second node
            "CYXWIZ_PROBATION_AUDITS": "0", "CYXWIZ_AUDIT_FRACTION": "0"}


@pytest.fixture(scope="session")
def valkey() -> Iterator[EmbeddedValkey]:
    server = EmbeddedValkey(Path(tempfile.mkdtemp(prefix="cyxwiz-valkey-")), persist=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(valkey: EmbeddedValkey) -> str:
    """The store's admin URL (tests inspect everything); the gateway runs as the gateway user."""
    return valkey.url


def start_gateway(redis_url: str, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """A real gateway process (Hypercorn, one worker) on a free port; returns it and its URL."""
    port = free_port()
    env = {**os.environ, **TEST_ENV, "CYXWIZ_REDIS_URL": redis_url, **(extra_env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "hypercorn", "functions.gateway:app", "--bind",
                             f"127.0.0.1:{port}", "--workers", "1"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    if not wait_healthy(url, 30):
        proc.kill()
        raise RuntimeError("the gateway did not become healthy")
    return proc, url


@pytest.fixture(scope="session")
def api_url(valkey: EmbeddedValkey) -> Iterator[str]:
    proc, url = start_gateway(valkey.gateway_url)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture()
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A plain (admin) client to inspect state; the database, and the store users of nodes, are
    emptied before each test."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushall()
    node_users = [u for u in client.acl_users() if u.startswith(store_users.NODE_USER_PREFIX)]
    if node_users:
        client.acl_deluser(*node_users)
    yield client
    client.close()


@pytest.fixture()
def creds(r: redis.Redis, redis_url: str) -> dict[str, str]:
    """A fresh admin key and join token installed in the (empty) store."""
    admin_key, join_token = auth.new_token("cwk"), auth.new_token("cwj")
    install_credentials_at(redis_url, admin_key, join_token)
    return {"api_key": admin_key, "join_token": join_token}


@pytest.fixture()
def http(api_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, timeout=10) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


CPU_CAPS: dict[str, Any] = {"device": "cpu", "cpu_cores": 2, "ram_mb": 24000}
GPU_CAPS: dict[str, Any] = {"device": "cuda", "cpu_cores": 16, "ram_mb": 131072,
                            "gpus": [{"name": "NVIDIA H200", "memory_mb": 143771, "compute_capability": "9.0"}]}


def register(http: httpx.Client, join_token: str, name: str | None = None, slots: int = 1,
             capabilities: dict[str, Any] | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Register a node over HTTP (a new identity, named uniquely unless ``name`` is given); returns the
    registration answer."""
    name = name or f"node-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "slots": slots, "capabilities": capabilities or CPU_CAPS, "labels": labels or {}}
    resp = http.post("/v1/nodes", json=body, headers=bearer(join_token))
    assert resp.status_code == 201, resp.text
    return resp.json()  # type: ignore[no-any-return]


DIGITS_SPEC = DIGITS_MLP_EXAMPLE


def model_weights(spec: dict[str, Any] | None = None) -> bytes:
    """A ``model.safetensors`` the gateway accepts for a job of ``spec`` (the digits example unless
    given): the right names and shapes, zero weights. Uploads of models are checked (issue 11)."""
    from shared.jobspec import parse_job_spec
    from shared.safetensors_check import placeholder_weights

    return placeholder_weights(parse_job_spec(spec or DIGITS_SPEC))


def submit(http: httpx.Client, api_key: str, spec: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    resp = http.post("/v1/jobs", json={**(spec or DIGITS_SPEC), **extra}, headers=bearer(api_key))
    assert resp.status_code == 201, resp.text
    return resp.json()  # type: ignore[no-any-return]


def keyspace(client: redis.Redis) -> dict[str, Any]:
    """Every key with its type and full value: compared before and after a rejected request. The
    control plane's pulse (``cyxwiz:plane:*``) is left out: every script and reaper tick marks it; so
    are the API keys' rate counters (``cyxwiz:rate:*``), which count refused requests too."""
    state: dict[str, Any] = {}
    for key in sorted(client.keys("*")):
        if key.startswith(("cyxwiz:plane:", "cyxwiz:rate:")):
            continue
        kind = client.type(key)
        if kind == "string":
            value: Any = client.get(key)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "set":
            value = sorted(client.smembers(key))
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "stream":
            value = client.xrange(key)
        else:
            value = None
        state[key] = (kind, value)
    return state


class KeepAlive:
    """Heartbeat some registered nodes from a thread, as their runtimes would, for tests that take
    longer than the test TTL."""

    def __init__(self, api_url: str, registrations: list[dict[str, Any]], interval_s: float = 0.3) -> None:
        import threading

        self.api_url, self.registrations, self.interval_s = api_url, registrations, interval_s
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.api_url, timeout=5) as client:
            while not self.stop_event.wait(self.interval_s):
                for reg in self.registrations:
                    client.post(f"/v1/nodes/{reg['node_id']}/heartbeat", headers=bearer(reg["session_token"]))

    def __enter__(self) -> KeepAlive:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join()


def assert_no_secret_on_command_lines(secrets: list[str]) -> None:
    """No process of this machine shows any of ``secrets`` on its command line (``ps`` shows those to
    every user of the host)."""
    assert all(len(secret) >= 16 for secret in secrets)
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue  # the process ended meanwhile
        assert not any(secret in text for secret in secrets), text
