"""``cyxwiz serve``: the gateway under Hypercorn, plus the embedded Valkey when no Redis URL is given.

The serve process is a supervisor: it starts the state store (if embedded) and the gateway as child
processes, restarts either if it dies, and on SIGTERM/SIGINT stops the gateway first, then the store
(which flushes its append-only file), and exits 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from cyxwiz.credentials import read_credentials, write_credentials
from cyxwiz.embedded import EmbeddedValkey, port_is_free
from shared import auth
from shared.settings import Settings
from shared.store import Store


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    redis_url: str | None = None
    data_dir: Path = field(default_factory=lambda: Path.home() / ".cyxwiz")
    workers: int = 1


def ensure_credentials(data_dir: Path, api_url: str, redis_url: str) -> dict[str, str]:
    """Read credentials.json, creating the admin key and join token on first start."""
    creds = read_credentials(data_dir)
    creds.setdefault("api_key", auth.new_token("cwk"))
    creds.setdefault("join_token", auth.new_token("cwj"))
    creds.update(api_url=api_url, redis_url=redis_url)
    write_credentials(creds, data_dir)
    return creds


def install_credentials_at(redis_url: str, admin_key: str, join_token: str) -> None:
    """Make an admin key and a join token known to the store at ``redis_url`` (idempotent)."""
    async def install() -> None:
        store = Store(Settings.from_env({**os.environ, "CYXWIZ_REDIS_URL": redis_url}))
        try:
            await auth.install_credentials(store, admin_key=admin_key, join_token=join_token)
        finally:
            await store.close()

    asyncio.run(install())


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _embedded_port(data_dir: Path) -> int | None:
    """Reuse the embedded server's port from a previous start, so nodes' redis_url stays valid."""
    creds = read_credentials(data_dir)
    url = creds.get("redis_url")
    if isinstance(url, str) and creds.get("embedded"):
        port = urlparse(url).port
        if port and port_is_free(port):
            return port
    return None


def _start_gateway(opts: ServeOptions, env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "hypercorn", "functions.gateway:app", "--bind", f"{opts.host}:{opts.port}",
               "--workers", str(opts.workers), "--graceful-timeout", "5"]
    if _has_uvloop():
        command += ["--worker-class", "uvloop"]
    # Its own process group: if the gateway dies, its leftover workers are killed with the group.
    return subprocess.Popen(command, env=env, start_new_session=True)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL whatever is left of a child's process group (Hypercorn's workers outlive a killed master)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def wait_healthy(api_url: str, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(api_url + "/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def serve(opts: ServeOptions) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    opts.data_dir.mkdir(parents=True, exist_ok=True)
    embedded = None
    redis_url = opts.redis_url
    if not redis_url:
        embedded = EmbeddedValkey(opts.data_dir, _embedded_port(opts.data_dir))
        embedded.start()
        redis_url = embedded.url
    api_url = f"http://{opts.host}:{opts.port}"
    creds = ensure_credentials(opts.data_dir, api_url, redis_url)
    if embedded is not None:
        write_credentials({**creds, "embedded": True}, opts.data_dir)
    install_credentials_at(redis_url, creds["api_key"], creds["join_token"])
    env = {**os.environ, "CYXWIZ_REDIS_URL": redis_url}
    gateway = _start_gateway(opts, env)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if wait_healthy(api_url):
        print(f"cyxwiz: serving on {api_url} (state store {redis_url}); credentials in "
              f"{opts.data_dir / 'credentials.json'}", flush=True)
    try:
        while not stopping:
            time.sleep(0.2)
            if embedded is not None and not embedded.alive() and not stopping:
                print("cyxwiz: the embedded state store died; restarting it", file=sys.stderr, flush=True)
                embedded.start()
            if gateway.poll() is not None and not stopping:
                print(f"cyxwiz: the gateway exited ({gateway.returncode}); restarting it", file=sys.stderr, flush=True)
                kill_group(gateway)
                gateway = _start_gateway(opts, env)
    finally:
        stop_process(gateway)
        kill_group(gateway)
        if embedded is not None:
            embedded.stop()
    return 0
