"""Servers for the benchmarks: Valkey and Hypercorn apps, each pinned to chosen CPUs.

Hypercorn runs exactly as ``cyxwiz serve`` starts the gateway (:func:`cyxwiz.server._start_gateway`):
one worker, the uvloop worker class when uvloop is installed, graceful timeout 5 s. The bare
endpoint (:mod:`load_tests.bare`) runs under the same command, so the two differ only in the app.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cyxwiz.embedded import EmbeddedValkey, free_port
from cyxwiz.server import _has_uvloop, stop_process, wait_healthy
from load_tests.stack import REPO, pinned
from shared import auth
from shared.settings import Settings
from shared.store import Store

# The benchmarks measure the control plane's own cost with one tenant and one load generator: tenants'
# quotas, the per-key rate limit and the per-address request cap would only measure themselves.
BENCH_LIMITS = {"CYXWIZ_RATE_LIMIT_PER_S": "0", "CYXWIZ_MAX_QUEUED_JOBS": "100000000",
                "CYXWIZ_MAX_RUNNING_JOBS": "100000000", "CYXWIZ_MAX_REQUESTS_PER_CLIENT": "100000",
                "CYXWIZ_MAX_REQUESTS": "100000", "CYXWIZ_PROBATION_AUDITS": "0", "CYXWIZ_AUDIT_FRACTION": "0"}


def hypercorn_command(app: str, port: int) -> list[str]:
    command = [sys.executable, "-m", "hypercorn", app, "--bind", f"127.0.0.1:{port}", "--workers", "1",
               "--graceful-timeout", "5"]
    if _has_uvloop():
        command += ["--worker-class", "uvloop"]
    return command


@contextmanager
def hypercorn(app: str, *, env: dict[str, str] | None = None, cpus: str | None = None) -> Iterator[tuple[str, int]]:
    """Serve ``app``; yields (url, pid of the server process)."""
    port = free_port()
    proc = subprocess.Popen(pinned(hypercorn_command(app, port), cpus), cwd=REPO,
                            env={**os.environ, **BENCH_LIMITS, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_healthy(url, 30):
            raise RuntimeError(f"{app} did not become healthy")
        yield url, proc.pid
    finally:
        stop_process(proc, 15)


@contextmanager
def valkey(*, cpus: str | None = None, fsync: str = "always") -> Iterator[EmbeddedValkey]:
    """The embedded Valkey as ``cyxwiz serve`` runs it (append-only file, ``appendfsync`` as given;
    ``"off"`` for no persistence), pinned to ``cpus``."""
    server = EmbeddedValkey(Path(tempfile.mkdtemp(prefix="cyxwiz-bench-")), persist=fsync != "off",
                            fsync=fsync if fsync != "off" else "always")
    server.start()
    if cpus and server.process is not None:
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(server.process.pid)], capture_output=True)
    try:
        yield server
    finally:
        server.stop()


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) used so far by a process and its children (Hypercorn's worker), from
    /proc; None where there is no /proc. Robust to other load on the machine, unlike requests/s."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total, todo = 0.0, [pid]
    try:
        while todo:
            current = todo.pop()
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    except (OSError, ValueError, IndexError):
        return None
    return total


def bench_settings(redis_url: str, **overrides: str) -> Settings:
    return Settings.from_env({"CYXWIZ_REDIS_URL": redis_url, **BENCH_LIMITS, **overrides})


async def fresh_credentials(redis_url: str) -> dict[str, str]:
    """Empty the store's database, then install a new admin key and join token, and a tenant key."""
    store = Store(bench_settings(redis_url))
    try:
        await store.redis.flushdb()
        admin, join = auth.new_token("cwk"), auth.new_token("cwj")
        await auth.install_credentials(store, admin_key=admin, join_token=join)
        tenant = await auth.create_api_key(store, "bench")
    finally:
        await store.close()
    return {"api_key": admin, "join_token": join, "tenant_key": tenant}


def run_async(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)
