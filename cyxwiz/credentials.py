"""The credentials file (``<data dir>/credentials.json``, mode 0600) and how clients find their settings:
a flag, else the environment variable, else the credentials file. Also the one way secrets are written
to disk (:func:`write_private`: 0600 files in 0700 directories)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from shared.settings import default_data_dir

FILE_NAME = "credentials.json"
ENV = {"api_url": "CYXWIZ_API_URL", "api_key": "CYXWIZ_API_KEY", "join_token": "CYXWIZ_JOIN_TOKEN",
       "redis_url": "CYXWIZ_REDIS_URL"}


class CredentialsError(ValueError):
    """The credentials file cannot be read (not JSON, not an object, unreadable): one line for the user."""


def credentials_path(data_dir: Path | None = None) -> Path:
    return (data_dir or default_data_dir()) / FILE_NAME


def read_credentials(data_dir: Path | None = None) -> dict[str, Any]:
    """The file's contents, or {} when there is none; :class:`CredentialsError` when it is unusable."""
    path = credentials_path(data_dir)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CredentialsError(f"{path} is not valid JSON ({exc}); `cyxwiz serve` writes it") from None
    if not isinstance(data, dict):
        raise CredentialsError(f"{path} must hold a JSON object; `cyxwiz serve` writes it")
    return data


def write_credentials(data: dict[str, Any], data_dir: Path | None = None) -> Path:
    """Write ``credentials.json`` (mode 0600, in a 0700 data dir)."""
    path = credentials_path(data_dir)
    write_private(path, json.dumps(data, indent=2))
    return path


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and make it 0700: it holds secrets."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write atomically, created with mode 0600 (never readable by others, even for a moment) in a
    0700 directory: for every file that holds a token, a key or a password."""
    private_dir(path.parent)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def resolve(name: str, flag: str | None, data_dir: Path | None = None) -> str | None:
    """A client setting: the flag, else ``$CYXWIZ_<NAME>``, else the credentials file."""
    if flag:
        return flag
    if os.environ.get(ENV[name]):
        return os.environ[ENV[name]]
    value = read_credentials(data_dir).get(name)
    return str(value) if value else None
