"""A small HTTP client for the contract's API (standard library only), used by the CLI.

Every way a request can fail becomes one exception with a sentence a person can act on: an
:class:`ApiError` for an error answer (with the contract's code), :class:`Unreachable` when no answer
came, :class:`CliError` for a URL that is not one. The CLI prints them on one line, never a traceback.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from cyxwiz.credentials import resolve

DEFAULT_API_URL = "http://127.0.0.1:8080"


class CliError(Exception):
    """A mistake or a state the CLI reports as one line on stderr (exit 1): a bad file, a malformed id."""


class ApiError(CliError):
    """An error answer of the API, with the contract's code and message."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (field {field})" if field else ""))
        self.status, self.code, self.message, self.field = status, code, message, field

    def explain(self) -> str:
        """One line for a person: the server's sentence, then the status and code (for scripts and bug
        reports), and what to do where that is clear."""
        if self.status == 0:
            return self.message
        text = f"{self.message} ({self.status} {self.code}" + (f", field {self.field}" if self.field else "") + ")"
        if self.status == 401:
            text += ": pass --api-key, set CYXWIZ_API_KEY, or use the --data-dir of the server you mean"
        elif self.status == 403 and self.code == "forbidden":
            text += ": this needs another key (the admin key is api_key in the server's credentials.json)"
        return text


class Unreachable(ApiError):
    """No answer at all: nothing listens there, the name does not resolve, or it answered too slowly."""

    def __init__(self, api_url: str, why: str) -> None:
        super().__init__(0, "unreachable", f"cannot reach the API at {api_url} ({why}): is `cyxwiz serve` "
                                           "running there?")

    def __str__(self) -> str:
        return self.message


class ApiClient:
    def __init__(self, api_url: str, token: str | None, timeout_s: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(api_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise CliError(f"{api_url!r} is not an API URL (they look like {DEFAULT_API_URL})")
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                raw: bool = False) -> Any:
        """Send one request; the decoded JSON (or bytes with raw=True), or :class:`ApiError`."""
        with self.open(method, path, body, headers) as resp:
            try:
                payload = resp.read()
            except (TimeoutError, OSError, http.client.HTTPException) as exc:
                raise Unreachable(self.api_url, f"the answer broke off: {_why(exc)}") from None
        if raw:
            return payload
        try:
            return json.loads(payload)
        except ValueError:
            raise ApiError(resp.status, "bad_answer", f"{self.api_url} answered {path} with something that is "
                                                      "not JSON: is that a CyxWiz API?") from None

    def open(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             timeout_s: float | None = -1.0) -> http.client.HTTPResponse:
        """Send one request and return the response to read as it arrives (a context manager), or raise
        :class:`ApiError`. ``timeout_s`` None waits forever between reads (a followed log)."""
        data = None if body is None else json.dumps(body).encode()
        try:
            req = urllib.request.Request(self.api_url + path, data=data, method=method)
        except ValueError:
            raise CliError(f"{self.api_url!r} is not an API URL (they look like {DEFAULT_API_URL})") from None
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        timeout = self.timeout_s if timeout_s == -1.0 else timeout_s
        try:
            return urllib.request.urlopen(req, timeout=timeout)  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            try:
                error = json.loads(payload)["error"]
                code, message, field = error.get("code", "error"), error.get("message", ""), error.get("field")
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ApiError(exc.code, "http_error", payload.decode(errors="replace")[:200]) from None
            raise ApiError(exc.code, code, message, field) from None
        except urllib.error.URLError as exc:
            raise Unreachable(self.api_url, _why(exc.reason)) from None
        except (TimeoutError, OSError, http.client.HTTPException) as exc:
            raise Unreachable(self.api_url, _why(exc)) from None
        except ValueError as exc:  # http.client.InvalidURL and friends: a URL with a bad port or host
            raise CliError(f"{self.api_url!r} is not an API URL ({exc})") from None


def _why(reason: object) -> str:
    """The short cause of a failed connection: 'Connection refused', not '[Errno 111] Connection refused'."""
    if isinstance(reason, TimeoutError):
        return "no answer in time"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def client_from_args(args: Any) -> ApiClient:
    """The client for a command's ``--api``, ``--api-key`` and ``--data-dir`` (each else its environment
    variable, else the data dir's credentials file)."""
    data_dir = Path(args.data_dir).expanduser() if getattr(args, "data_dir", None) else None
    api_url = resolve("api_url", getattr(args, "api", None), data_dir) or DEFAULT_API_URL
    api_key = resolve("api_key", getattr(args, "api_key", None), data_dir)
    if not api_key:
        raise CliError("no API key: pass --api-key, set CYXWIZ_API_KEY, or run `cyxwiz serve` first (it writes "
                       "the admin key into <data dir>/credentials.json)")
    return ApiClient(api_url, api_key)
