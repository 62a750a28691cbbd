"""A node runtime's identity across restarts: its registration, kept in ``<data dir>/nodes/<name>.json``
(mode 0600: it holds the session token).

A runtime that restarts within its TTL (a crash, an upgrade, ``kill -9``) resumes as the same node:
its attempts are still current, so it reads its own pending assignment entries first and restarts
those jobs from their checkpoints at once, instead of waiting for the control plane to reap it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any


def identity_path(state_dir: Path, name: str) -> Path:
    return state_dir / (re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".json")


def load_identity(path: Path, api_url: str) -> dict[str, Any] | None:
    """The saved registration for this API, or None (none saved, another API, unreadable)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("api_url") != api_url:
        return None
    return saved.get("registration") if isinstance(saved.get("registration"), dict) else None


def save_identity(path: Path, api_url: str, registration: dict[str, Any]) -> None:
    """Write atomically, created with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"api_url": api_url, "registration": registration}, f)
    os.replace(tmp, path)


def forget_identity(path: Path) -> None:
    path.unlink(missing_ok=True)
