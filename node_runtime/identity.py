"""A node runtime's identity: its node key (``<data dir>/nodes/<name>.key``), which alone may register
its name, and its current registration (``<name>.json``, with the session token and the store URL of
its own store user). Both are mode 0600 in a 0700 directory.

A runtime that restarts within its TTL (a crash, an upgrade, ``kill -9``) resumes as the same node:
its attempts are still current, so it reads its own pending assignment entries first and restarts
those jobs from their checkpoints at once, instead of waiting for the control plane to reap it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path
from typing import IO, Any

from cyxwiz.credentials import private_dir, write_private


def identity_path(state_dir: Path, name: str) -> Path:
    return state_dir / (re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".json")


def lock_identity(path: Path) -> IO[bytes] | None:
    """Hold ``<name>.lock`` for the life of this process; None if another live runtime holds it (two
    runtimes with one name and data dir must not both be that node: each would run its jobs)."""
    private_dir(path.parent)
    fd = os.open(path.with_suffix(".lock"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    handle = os.fdopen(fd, "ab")  # held open while the process lives
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def load_identity(path: Path, api_url: str, registered_as: dict[str, Any]) -> dict[str, Any] | None:
    """The saved registration, if it was made at this API with this same registration body (slots,
    capabilities, labels: a runtime started differently registers anew); else None."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("api_url") != api_url or saved.get("body") != registered_as:
        return None
    return saved.get("registration") if isinstance(saved.get("registration"), dict) else None


def save_identity(path: Path, api_url: str, registered_as: dict[str, Any], registration: dict[str, Any]) -> None:
    write_private(path, json.dumps({"api_url": api_url, "body": registered_as, "registration": registration}))



def forget_identity(path: Path) -> None:
    path.unlink(missing_ok=True)


def node_key_path(state_dir: Path, name: str) -> Path:
    """``<name>.key``: the node identity's secret (mode 0600). Unlike the registration it is never
    forgotten: only its holder can register this name again, and reputation follows the name."""
    return identity_path(state_dir, name).with_suffix(".key")


def load_node_key(path: Path) -> str | None:
    try:
        key = path.read_text().strip()
    except OSError:
        return None
    return key or None


def save_node_key(path: Path, key: str) -> None:
    write_private(path, key + "\n")
