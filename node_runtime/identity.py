"""A node runtime's identity across restarts: its registration, kept in ``<data dir>/nodes/<name>.json``
(mode 0600: it holds the session token).

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


def identity_path(state_dir: Path, name: str) -> Path:
    return state_dir / (re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".json")


def lock_identity(path: Path) -> IO[bytes] | None:
    """Hold ``<name>.lock`` for the life of this process; None if another live runtime holds it (two
    runtimes with one name and data dir must not both be that node: each would run its jobs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path.with_suffix(".lock"), "ab")  # noqa: SIM115 - held open while the process lives
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
    """Write atomically, created with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"api_url": api_url, "body": registered_as, "registration": registration}, f)
    os.replace(tmp, path)


def forget_identity(path: Path) -> None:
    path.unlink(missing_ok=True)
