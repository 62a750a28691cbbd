"""The node's HTTP client for the control plane (httpx), with one rule for what to retry.

An answer is either usable, *refused* (a 4xx other than 408/429: the same request can never
succeed, e.g. 409 ``stale_attempt`` or 401 for a reaped node), or *unavailable* (no connection,
a timeout, 429, 5xx, 503 while the state store is away): unavailable calls are retried with
exponential backoff and jitter, honouring Retry-After. :class:`JobApi` (blocking) serves a job
process; :class:`AgentApi` (asyncio) serves the runtime's registration, heartbeats and reports.
"""

from __future__ import annotations

import asyncio
import functools
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx

T = TypeVar("T")
ATTEMPT_HEADER = "X-CyxWiz-Attempt"
# 409 codes that mean "stop this job now": the attempt moved on, the user cancelled, it already ended
STOP_CODES = frozenset({"stale_attempt", "job_cancelled", "job_terminal"})
TIMEOUT = httpx.Timeout(30.0, connect=5.0)


class ApiRefused(Exception):
    """A definitive error answer: retrying the same request cannot help."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message

    @property
    def node_unknown(self) -> bool:
        """The control plane no longer knows this node (its heartbeat lapsed): register again."""
        return self.status == 401 or (self.status == 404 and self.code == "not_found")


class ApiUnavailable(Exception):
    """The control plane could not answer now (network, timeout, overload); try again later."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Backoff:
    """Exponential delays with full jitter, from ``initial_s`` up to ``maximum_s``."""

    def __init__(self, initial_s: float = 0.2, maximum_s: float = 10.0) -> None:
        self.initial_s, self.maximum_s = initial_s, maximum_s
        self.failures = 0

    def next_delay(self, retry_after_s: float | None = None) -> float:
        ceiling = min(self.maximum_s, self.initial_s * 2 ** min(self.failures, 20))
        self.failures += 1
        delay = random.uniform(ceiling / 2, ceiling)
        return max(delay, min(retry_after_s or 0.0, self.maximum_s))

    def reset(self) -> None:
        self.failures = 0


def check_answer(response: httpx.Response) -> httpx.Response:
    """Return a 2xx response; raise :class:`ApiRefused` or :class:`ApiUnavailable` for the rest."""
    if response.is_success:
        return response
    code, message = "http_error", response.text[:300]
    try:
        error = response.json()["error"]
        code, message = str(error.get("code", code)), str(error.get("message", message))
    except (ValueError, KeyError, TypeError):
        pass
    if response.status_code in (408, 429) or response.status_code >= 500:
        retry_after = response.headers.get("retry-after", "")
        raise ApiUnavailable(f"{response.status_code} {code}: {message}",
                             float(retry_after) if retry_after.replace(".", "", 1).isdigit() else None)
    raise ApiRefused(response.status_code, code, message)


@functools.cache
def tls_verify(ca_file: str | None) -> ssl.SSLContext:
    """What httpx verifies an https API against: its default CAs, or a private CA's file. One context per
    file and process, shared by its clients: building one reads the whole CA bundle (~30 ms), a job process
    opens two clients, and the warm forkserver builds it once for all the jobs it forks (warm.py)."""
    return ssl.create_default_context(cafile=ca_file) if ca_file else httpx.create_ssl_context()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class JobApi:
    """Blocking calls for one attempt of one job, with the node's session token (a job process)."""

    def __init__(self, api_url: str, session_token: str, job_id: str, attempt: int,
                 retry_max_s: float = 10.0, ca_file: str | None = None) -> None:
        self.job_id, self.attempt, self.retry_max_s = job_id, attempt, retry_max_s
        self.client = httpx.Client(base_url=api_url, headers=_bearer(session_token), timeout=TIMEOUT,
                                   verify=tls_verify(ca_file))

    def close(self) -> None:
        self.client.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return check_answer(self.client.request(method, path, **kwargs))
        except httpx.TransportError as exc:  # connection refused or reset, timeouts
            raise ApiUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def report(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST a progress report (``attempt`` is filled in)."""
        answer: dict[str, Any] = self._send("POST", f"/v1/jobs/{self.job_id}/progress",
                                            json={**body, "attempt": self.attempt}).json()
        return answer

    def rendezvous(self, rank: int, port: int | None = None, ready: bool = False) -> dict[str, Any]:
        """A gang rank arrives (rank 0 with its store's ``port``) or says it is ready (docs/distributed.md)."""
        body: dict[str, Any] = {"attempt": self.attempt, "rank": rank, "ready": ready}
        if port is not None:
            body["port"] = port
        answer: dict[str, Any] = self._send("POST", f"/v1/jobs/{self.job_id}/rendezvous", json=body).json()
        return answer

    def read_rendezvous(self, rank: int) -> dict[str, Any]:
        """The rendezvous state of this attempt, as rank ``rank`` sees it."""
        answer: dict[str, Any] = self._send("GET", f"/v1/jobs/{self.job_id}/rendezvous",
                                            params={"attempt": self.attempt, "rank": rank}).json()
        return answer

    def append_logs(self, lines: list[dict[str, str]]) -> None:
        """POST log lines (``{"time", "line"}``, oldest first) of this attempt; fenced like reports."""
        self._send("POST", f"/v1/jobs/{self.job_id}/logs", json={"attempt": self.attempt, "lines": lines})

    def upload(self, name: str, data: bytes) -> None:
        """PUT an artifact of this attempt (fenced: a stale attempt is refused)."""
        self._send("PUT", f"/v1/jobs/{self.job_id}/artifacts/{name}", content=data,
                   headers={ATTEMPT_HEADER: str(self.attempt), "Content-Type": "application/octet-stream"})

    def download(self, name: str, give_up: Callable[[], bool] = lambda: False) -> bytes | None:
        """GET an artifact of the job, or None when it has none; a broken transfer resumes with Range."""
        data = bytearray()
        backoff = Backoff(maximum_s=self.retry_max_s)
        while True:
            headers = {"Range": f"bytes={len(data)}-"} if data else {}
            try:
                with self.client.stream("GET", f"/v1/jobs/{self.job_id}/artifacts/{name}", headers=headers) as resp:
                    if resp.status_code == 404:
                        return None
                    if resp.status_code == 200:
                        data.clear()  # the server sent the whole artifact, not the range
                    elif resp.status_code != 206:
                        resp.read()
                        check_answer(resp)
                    for piece in resp.iter_bytes():
                        data += piece
                return bytes(data)
            except (httpx.TransportError, ApiUnavailable) as exc:
                if give_up():
                    raise ApiUnavailable(f"download of {name} abandoned: {exc}") from exc
                time.sleep(backoff.next_delay(getattr(exc, "retry_after_s", None)))

    def report_verification(self, task_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a verification task's report (``attempt`` is filled in)."""
        answer: dict[str, Any] = self._send("POST", f"/v1/verifications/{task_id}",
                                            json={**body, "attempt": self.attempt}).json()
        return answer

    def retrying(self, call: Callable[[], T], give_up: Callable[[], bool] = lambda: False) -> T:
        """Run ``call`` until it succeeds or is refused; while unavailable, back off and retry
        (unless ``give_up()`` says the result is no longer wanted, then raise ApiUnavailable)."""
        backoff = Backoff(maximum_s=self.retry_max_s)
        while True:
            try:
                return call()
            except ApiUnavailable as exc:
                if give_up():
                    raise
                time.sleep(backoff.next_delay(exc.retry_after_s))


class AgentApi:
    """Asynchronous calls of the runtime itself: register, heartbeat, deregister, and the reports it
    makes for a job whose process died."""

    def __init__(self, api_url: str, ca_file: str | None = None) -> None:
        self.client = httpx.AsyncClient(base_url=api_url, timeout=TIMEOUT, verify=tls_verify(ca_file))

    async def close(self) -> None:
        await self.client.aclose()

    async def _send(self, method: str, path: str, token: str, **kwargs: Any) -> Any:
        try:
            response = await self.client.request(method, path, headers=_bearer(token), **kwargs)
        except httpx.TransportError as exc:
            raise ApiUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return check_answer(response).json()

    async def register(self, join_token: str, body: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = await self._send("POST", "/v1/nodes", join_token, json=body)
        return answer

    async def heartbeat(self, node_id: str, token: str, gpu_free_mb: int | None,
                        stream_error: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {} if gpu_free_mb is None else {"gpu_free_mb": gpu_free_mb}
        if stream_error:
            body["stream_error"] = stream_error
        answer: dict[str, Any] = await self._send("POST", f"/v1/nodes/{node_id}/heartbeat", token, json=body)
        return answer

    async def attempt_is_current(self, job_id: str, attempt: int, token: str) -> bool:
        """Whether this attempt of the job is still live and this node's; a job that is gone or was
        given to another node is not (403/404)."""
        try:
            answer = await self._send("GET", f"/v1/jobs/{job_id}/attempts/{attempt}", token)
        except ApiRefused as exc:
            if exc.status in (403, 404):
                return False
            raise
        return bool(answer["current"])

    async def deregister(self, node_id: str, token: str) -> str:
        """DELETE the node: it drains; the answer's status is ``draining`` or ``removed``."""
        answer = await self._send("DELETE", f"/v1/nodes/{node_id}", token)
        return str(answer["status"])

    async def report_verification(self, task_id: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = await self._send("POST", f"/v1/verifications/{task_id}", token, json=body)
        return answer

    async def report(self, job_id: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = await self._send("POST", f"/v1/jobs/{job_id}/progress", token, json=body)
        return answer


async def retry_async(call: Callable[[], Awaitable[T]], give_up: Callable[[], bool] = lambda: False,
                      backoff: Backoff | None = None) -> T:
    """Await ``call`` until it succeeds or is refused, backing off while the API is unavailable."""
    backoff = backoff or Backoff()
    while True:
        try:
            return await call()
        except ApiUnavailable as exc:
            if give_up():
                raise
            await asyncio.sleep(backoff.next_delay(exc.retry_after_s))
