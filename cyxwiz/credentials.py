"""The credentials file (``<data dir>/credentials.json``, mode 0600) and how clients find their settings:
a flag, else the environment variable, else the credentials file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from shared.settings import default_data_dir

FILE_NAME = "credentials.json"
ENV = {"api_url": "CYXWIZ_API_URL", "api_key": "CYXWIZ_API_KEY", "join_token": "CYXWIZ_JOIN_TOKEN",
       "redis_url": "CYXWIZ_REDIS_URL"}


def credentials_path(data_dir: Path | None = None) -> Path:
    return (data_dir or default_data_dir()) / FILE_NAME


def read_credentials(data_dir: Path | None = None) -> dict[str, Any]:
    """The file's contents, or {} when there is none."""
    path = credentials_path(data_dir)
    if not path.exists():
        return {}
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def write_credentials(data: dict[str, Any], data_dir: Path | None = None) -> Path:
    """Write atomically with mode 0600 (created so, never world-readable even for a moment)."""
    path = credentials_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def resolve(name: str, flag: str | None, data_dir: Path | None = None) -> str | None:
    """A client setting: the flag, else ``$CYXWIZ_<NAME>``, else the credentials file."""
    if flag:
        return flag
    if os.environ.get(ENV[name]):
        return os.environ[ENV[name]]
    value = read_credentials(data_dir).get(name)
    return str(value) if value else None
