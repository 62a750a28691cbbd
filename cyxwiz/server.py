"""``cyxwiz serve``: the gateway under Hypercorn, plus the embedded Valkey when no Redis URL is given.

The serve process is a supervisor: it starts the state store (if embedded) and the gateway as child
processes, restarts either if it dies, and on SIGTERM/SIGINT stops the gateway first, then the store
(which flushes its append-only file), and exits 0.

Before it changes anything it checks that its ports are free and takes the data dir's lock, so a
second ``cyxwiz serve`` on the same data dir or port exits at once and changes nothing. The embedded
store keeps its port across restarts (``store_port`` in ``credentials.json``), and every start of it
recreates the store users of registered nodes, so running nodes keep reading their streams.
Secrets go to the gateway through its environment and to disk only in 0600 files (0700 data dir).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import math
import os
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cyxwiz.credentials import private_dir, read_credentials, write_credentials
from cyxwiz.embedded import EmbeddedValkey, free_port, local_address, port_is_free
from shared import auth, store_users
from shared.settings import Settings
from shared.store import Store

GATEWAY_START_TIMEOUT_S = 60.0


class ServeError(Exception):
    """``cyxwiz serve`` cannot start as asked; nothing was changed."""


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    redis_url: str | None = None
    data_dir: Path = field(default_factory=lambda: Path.home() / ".cyxwiz")
    workers: int = 1
    public_url: str | None = None          # the API URL that clients and nodes on other hosts use
    public_redis_host: str | None = None   # the store host nodes are told to use (NAT, DNS)
    certfile: str | None = None            # HTTPS for the gateway
    keyfile: str | None = None

    @property
    def local_api_url(self) -> str:
        """The URL this process reaches its own gateway at."""
        return f"{'https' if self.certfile else 'http'}://{local_address(self.host, self.port)}"


def install_credentials_at(redis_url: str, admin_key: str, join_token: str) -> None:
    """Make an admin key and a join token known to the store at ``redis_url`` (idempotent)."""
    asyncio.run(_prepare_store(redis_url, admin_key, join_token, restore_users=False))


async def _prepare_store(redis_url: str, admin_key: str, join_token: str, *, restore_users: bool) -> int:
    """Install the credentials file's admin key and join token; recreate registered nodes' store users
    (a restarted embedded store loads only its ACL file); how many node users were recreated."""
    store = Store(Settings.from_env({**os.environ, "CYXWIZ_REDIS_URL": redis_url}))
    try:
        await auth.install_credentials(store, admin_key=admin_key, join_token=join_token)
        return await store_users.restore_node_users(store.redis) if restore_users else 0
    finally:
        await store.close()


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


def lock_data_dir(data_dir: Path) -> IO[bytes]:
    """Hold ``<data dir>/serve.lock`` for the life of this process; ServeError if another serve has it."""
    private_dir(data_dir)
    fd = os.open(data_dir / "serve.lock", os.O_RDWR | os.O_CREAT, 0o600)
    handle = os.fdopen(fd, "r+b")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = handle.read().decode(errors="replace").strip() or "?"
        handle.close()
        raise ServeError(f"another `cyxwiz serve` (pid {other}) is using the data dir {data_dir}") from None
    handle.truncate(0)
    handle.write(str(os.getpid()).encode())
    handle.flush()
    return handle


def _check_port(host: str, port: int, what: str) -> None:
    if not port_is_free(port, host):
        raise ServeError(f"{what} port {host}:{port} is in use (another `cyxwiz serve`?); pass another port")


def _start_gateway(opts: ServeOptions, env: dict[str, str]) -> subprocess.Popen[bytes]:
    # --read-timeout: a socket that sends nothing at all for this long while its request is being read
    # is closed (Hypercorn does not read while a handler answers, so streams are not affected); the
    # edge middleware's body deadline handles a body that trickles. --backlog: Hypercorn's 100 pending
    # connections overflow under a connection flood, and a node's heartbeat then waits 1-7 s in SYN
    # retransmits. 4096: Linux's default net.core.somaxconn, which caps it anyway.
    read_timeout = max(1, math.ceil(Settings.from_env(env).body_timeout_s))
    command = [sys.executable, "-m", "hypercorn", "functions.gateway:app", "--bind", _bind(opts.host, opts.port),
               "--workers", str(opts.workers), "--graceful-timeout", "5", "--read-timeout", str(read_timeout),
               "--backlog", "4096"]
    if opts.certfile and opts.keyfile:
        command += ["--certfile", opts.certfile, "--keyfile", opts.keyfile]
    if _has_uvloop():
        command += ["--worker-class", "uvloop"]
    # Every connection is a descriptor: the gateway may hold as many as the hard limit allows (the
    # soft one is often 1,024), or a few thousand idle sockets would stop it accepting a node's.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):  # set here, not in a preexec_fn (unsafe with threads)
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))  # the gateway inherits it
    # Its own process group: if the gateway dies, its leftover workers are killed with the group.
    return subprocess.Popen(command, env=env, start_new_session=True)


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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


def wait_healthy(api_url: str, timeout_s: float = 30.0, alive: Callable[[], bool] | None = None) -> bool:
    """Poll ``/healthz`` until it answers 200 (False after ``timeout_s``, or once ``alive()`` is False).
    An https URL is probed without verifying its certificate: this is our own child on this host."""
    context = ssl._create_unverified_context() if api_url.startswith("https:") else None  # noqa: S323
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(api_url + "/healthz", timeout=1, context=context) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        if alive is not None and not alive():
            return False
        time.sleep(0.1)
    return False


def _start_store(opts: ServeOptions, creds: dict[str, Any]) -> EmbeddedValkey:
    """The embedded store on the serve host, on the port it had before (or a new one, kept from now on)."""
    port = int(creds.get("store_port") or 0) or None
    if port is not None:
        _check_port(opts.host, port, "the embedded store's (kept from its last start)")
    store = EmbeddedValkey(opts.data_dir, port or free_port(), host=opts.host,
                           admin_password=creds.get("store_admin_password") or None,
                           gateway_password=creds.get("store_gateway_password") or None)
    store.start()
    return store


def serve(opts: ServeOptions) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code (1, at once and with nothing changed, when the
    data dir or a port is already in use)."""
    try:
        _check_port(opts.host, opts.port, "the API")  # first: it creates nothing
        lock = lock_data_dir(opts.data_dir)
        return _serve_locked(opts, lock)
    except ServeError as exc:
        print(f"cyxwiz serve: {exc}", file=sys.stderr, flush=True)
        return 1


def _serve_locked(opts: ServeOptions, lock: IO[bytes]) -> int:
    creds = read_credentials(opts.data_dir)
    embedded = _start_store(opts, creds) if not opts.redis_url else None
    try:
        creds.setdefault("api_key", auth.new_token("cwk"))
        creds["api_key_id"] = auth.key_id_of(auth.hash_token(creds["api_key"]))  # what `cyxwiz keys list` shows
        creds.setdefault("join_token", auth.new_token("cwj"))
        creds["api_url"] = opts.public_url or opts.local_api_url
        if embedded is not None:
            creds.update(redis_url=embedded.url, store_port=embedded.port, embedded=True,
                         store_admin_password=embedded.admin_password,
                         store_gateway_password=embedded.gateway_password)
            gateway_url = embedded.gateway_url
        else:
            assert opts.redis_url is not None
            creds.update(redis_url=opts.redis_url, embedded=False)
            gateway_url = opts.redis_url
        write_credentials(creds, opts.data_dir)
        restored = asyncio.run(_prepare_store(creds["redis_url"], creds["api_key"], creds["join_token"],
                                              restore_users=True))
        env = {**os.environ, "CYXWIZ_REDIS_URL": gateway_url}  # the environment: never on a command line
        if opts.workers > 1:  # each worker times its own requests: /metrics adds them up from files here
            metrics_dir = opts.data_dir / "prometheus"
            shutil.rmtree(metrics_dir, ignore_errors=True)
            metrics_dir.mkdir(parents=True)
            env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        if opts.public_redis_host:
            address = store_users.without_credentials(creds["redis_url"])
            env["CYXWIZ_NODE_STORE_URL"] = store_users.with_host(address, opts.public_redis_host)
        return _supervise(opts, embedded, env, creds, restored)
    finally:
        if embedded is not None:
            embedded.stop()
        lock.close()


def _supervise(opts: ServeOptions, embedded: EmbeddedValkey | None, env: dict[str, str], creds: dict[str, Any],
               restored: int) -> int:
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    gateway = _start_gateway(opts, env)
    try:
        if not wait_healthy(opts.local_api_url, GATEWAY_START_TIMEOUT_S, alive=lambda: gateway.poll() is None):
            if not stopping:
                print(f"cyxwiz serve: the gateway did not start at {opts.local_api_url} (exit "
                      f"{gateway.poll()}); see its output above", file=sys.stderr, flush=True)
            return 0 if stopping else 1
        store_text = f"state store {store_users.without_credentials(creds['redis_url'])}" + (
            f", {restored} node user(s) restored" if restored else "")
        print(f"cyxwiz: serving on {creds['api_url']} ({store_text}); credentials in "
              f"{opts.data_dir / 'credentials.json'}", flush=True)
        while not stopping:
            time.sleep(0.2)
            if embedded is not None and not embedded.alive() and not stopping:
                print("cyxwiz: the embedded state store died; restarting it", file=sys.stderr, flush=True)
                try:
                    embedded.start()
                    asyncio.run(_prepare_store(creds["redis_url"], creds["api_key"], creds["join_token"],
                                               restore_users=True))
                except Exception as exc:  # noqa: BLE001 - try again on the next turn
                    print(f"cyxwiz: restarting the state store failed ({exc}); retrying", file=sys.stderr, flush=True)
                    embedded.kill()
            if gateway.poll() is not None and not stopping:
                print(f"cyxwiz: the gateway exited ({gateway.returncode}); restarting it", file=sys.stderr, flush=True)
                kill_group(gateway)
                gateway = _start_gateway(opts, env)
    finally:
        stop_process(gateway)
        kill_group(gateway)
    return 0
