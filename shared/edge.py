"""The HTTP edge: the limits every request meets before and around its handler, whoever sent it.

One pure-ASGI middleware, :class:`EdgeLimits`, installed by :func:`shared.http.make_app` around every
function, so that an unauthenticated client cannot hold the server's connections or tasks:

- **In-flight caps.** At most ``max_requests_per_client`` requests in flight per client address and
  ``max_requests`` in all, per process. Past either: 503 ``overloaded`` at once, with ``Retry-After``
  and ``Connection: close``, the body unread. The last eighth of the total is kept for addresses with
  nothing else in flight, so a flood from a few addresses cannot starve a node's lone heartbeat.
- **Body deadline.** Each piece of a request body must arrive by
  ``start + body_timeout_s + bytes_so_far / min_body_rate_bps``: a large upload on a slow link passes,
  a drip does not. On expiry the handler's next ``receive()`` answers ``http.disconnect`` (Starlette
  raises ClientDisconnect, which the error table turns into 408 ``request_timeout``); a handler that
  does not answer gets the 408 from here. Either way the connection closes.
- **Request deadline.** An ordinary request is answered within ``request_timeout_s`` or its handler is
  cancelled: 503 ``request_timeout`` (503, not 504: this server is the origin, and clients already
  retry a 503 after its ``Retry-After``). Streams are exempt once their response has started (event
  streams, log follows, artifact downloads); artifact uploads are bounded by the body deadline alone.
- **Bounded drain.** A response that starts before its request's body was read (an early refusal,
  a 413 from Content-Length) waits until the rest of the body was read and discarded, so a client
  that sends its whole body before reading (httpx) sees the answer instead of a reset. At most
  :data:`DRAIN_LIMIT_BYTES`, within the body deadline; past that the answer is sent anyway and the
  connection closes. A drained body over ``max_body_bytes`` also closes the connection.

Limits are per process and per address as the server sees it: behind a proxy every client is the
proxy's address, so put the caps there instead (docs/design.md).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import errors
from shared.settings import Settings

log = logging.getLogger("cyxwiz.edge")

DRAIN_LIMIT_BYTES = 32 << 20  # read at most this much of a refused body before answering
DISCARD_WAIT_S = 60.0         # the server reports a closed connection at once; this only bounds a surprise
OVERLOAD_RETRY_AFTER_S = 2
_ARTIFACT = re.compile(r"/v1/jobs/[^/]+/artifacts/[^/]+")
_STREAM = re.compile(r"/v1/jobs/[^/]+/(events|logs)")  # SSE; the contract's `logs?follow=1`


_DISCARDING: dict[_Exchange, asyncio.Task[None]] = {}  # discards outlive their request: keep them referenced


class Deadline(enum.Enum):
    """How long the request deadline covers a request."""

    WHOLE = "whole"                    # until the response's last byte was handed over
    UNTIL_RESPONSE = "until_response"  # until the response starts: a stream then runs as long as it needs
    NONE = "none"                      # an upload: its body deadline bounds it


def request_deadline(method: str, path: str) -> Deadline:
    """Which part of a request ``request_timeout_s`` covers."""
    if _ARTIFACT.fullmatch(path):
        return Deadline.NONE if method == "PUT" else Deadline.UNTIL_RESPONSE
    if method == "GET" and _STREAM.fullmatch(path):  # a node's POST of log lines is an ordinary request
        return Deadline.UNTIL_RESPONSE
    return Deadline.WHOLE


class InFlight:
    """Requests in flight per client address and in all, for one process."""

    def __init__(self, per_client: int, total: int) -> None:
        self.per_client, self.limit = per_client, total
        self.reserve = total // 8
        self.by_client: dict[str, int] = {}
        self.total = 0

    def admit(self, client: str) -> bool:
        """Count one more request of ``client`` in, or refuse it (False)."""
        mine = self.by_client.get(client, 0)
        if mine >= self.per_client or self.total >= self.limit:
            return False
        if mine and self.total >= self.limit - self.reserve:
            return False  # the reserve is for addresses with nothing else in flight
        self.by_client[client] = mine + 1
        self.total += 1
        return True

    def release(self, client: str) -> None:
        mine = self.by_client[client] - 1
        if mine:
            self.by_client[client] = mine
        else:
            del self.by_client[client]
        self.total -= 1


class EdgeLimits:
    """The ASGI middleware; settings are fixed at construction (the store only exists from start-up)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.in_flight = InFlight(settings.max_requests_per_client, settings.max_requests)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope["client"][0] if scope.get("client") else ""
        exchange = _Exchange(self.app, self.settings, scope, receive, send)
        if not self.in_flight.admit(client):
            await exchange.refuse(errors.Overloaded(retry_after_s=OVERLOAD_RETRY_AFTER_S))
            return
        try:
            await exchange.run()
        finally:
            self.in_flight.release(client)


class _Exchange:
    """One request through the edge: its deadlines, its body's progress, whether its response started."""

    def __init__(self, app: ASGIApp, settings: Settings, scope: Scope, receive: Receive, send: Send) -> None:
        self.app, self.settings, self.scope = app, settings, scope
        self._receive, self._send = receive, send
        self.start = asyncio.get_running_loop().time()
        self.deadline = request_deadline(scope["method"], scope["path"])
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"").strip()
        self.declared = int(declared) if declared.isdigit() else None
        self.body_done = b"transfer-encoding" not in headers and not self.declared  # no body to wait for
        self.received = 0
        self.disconnected = False  # what the app is told: the client left, or its body ran out of time
        self.gone = False          # what the server said: the connection is closed
        self.body_expired = False
        self.may_drain = True
        self.response_started = False
        self.lock = asyncio.Lock()  # a streaming response listens for the disconnect while the edge drains
        self.timer: asyncio.Timeout | None = None
        self.timing = False  # inside the timer (the edge's own answers come after it)

    async def refuse(self, exc: errors.ApiError) -> None:
        """Answer at once, the body unread."""
        self.may_drain = False
        await send_error(self.send, exc)

    async def run(self) -> None:
        due = None if self.deadline is Deadline.NONE else self.start + self.settings.request_timeout_s
        timer = self.timer = asyncio.timeout_at(due)
        try:
            async with timer:
                self.timing = True
                try:
                    await self.app(self.scope, self.receive, self.send)
                finally:
                    self.timing = False
        except TimeoutError:
            if not timer.expired():
                raise  # not ours
            if not self.response_started:
                self.may_drain = False
                await send_error(self.send, errors.DeadlineExceeded(
                    f"the request was not answered within {self.settings.request_timeout_s:g} s"))
            return  # a started response is cut off: the server closes the connection
        finally:
            self._discard_rest()
        if self.body_expired and not self.response_started:
            await send_error(self.send, body_timeout_error(self.settings))

    async def receive(self) -> Message:
        async with self.lock:
            return await self._next()

    async def _next(self) -> Message:
        if self.disconnected:
            return {"type": "http.disconnect"}
        if self.body_done:  # e.g. a stream waiting for its client to leave: no deadline
            message = await self._receive()
        else:
            due = self.start + self.settings.body_timeout_s + self.received / self.settings.min_body_rate_bps
            try:
                async with asyncio.timeout_at(due):
                    message = await self._receive()
            except TimeoutError:
                self.body_expired = self.disconnected = True
                return {"type": "http.disconnect"}
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.body_done = not message.get("more_body", False)
        elif message["type"] == "http.disconnect":
            self.disconnected = self.gone = True
            if self in _DISCARDING:
                _DISCARDING[self].cancel()  # the app heard it first: nothing more will come
        return message

    async def _drain(self) -> bool:
        """Read and discard the rest of the body (bounded); whether all of it was read."""
        if not self.may_drain or (self.declared is not None and self.declared > DRAIN_LIMIT_BYTES):
            return False  # refused unread, or not worth reading: the connection closes instead
        async with self.lock:
            while not self.body_done and not self.disconnected and self.received <= DRAIN_LIMIT_BYTES:
                await self._next()
        return self.body_done and not self.disconnected

    def _discard_rest(self) -> None:
        """Answered with the body unread: take what the server still queues for this request until it
        reports the connection closed. Hypercorn waits for room in that (10-message) queue to say
        so, and would otherwise hold the connection forever, even after its client left."""
        if self.body_done or self.gone or self in _DISCARDING:
            return
        _DISCARDING[self] = asyncio.create_task(self._consume_until_closed())

    async def _consume_until_closed(self) -> None:
        try:
            async with asyncio.timeout(DISCARD_WAIT_S):
                while (await self._receive())["type"] != "http.disconnect":
                    pass
        except TimeoutError:
            log.warning("no disconnect from the server %g s after answering %s %s", DISCARD_WAIT_S,
                        self.scope["method"], self.scope["path"])
        finally:
            self.gone = True
            _DISCARDING.pop(self, None)

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            close = self.body_expired or self.disconnected
            if not self.body_done and not close:
                close = not await self._drain()
            if close or self.received > self.settings.max_body_bytes:
                message = {**message, "headers": _with_close(message.get("headers", []))}
            self.response_started = True
            if not self.body_done:
                self._discard_rest()  # before the answer: its last piece is when the server needs room
            if self.deadline is Deadline.UNTIL_RESPONSE:
                self._stop_timer()  # the stream itself may run for hours
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self._stop_timer()  # background tasks after the response are not cut
        await self._send(message)

    def _stop_timer(self) -> None:
        if self.timing and self.timer is not None and not self.timer.expired():
            self.timer.reschedule(None)


def _with_close(headers: Any) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in headers if name.lower() != b"connection"] + [(b"connection", b"close")]


async def send_error(send: Send, exc: errors.ApiError) -> None:
    """Answer with ``exc`` in the contract's error shape and close the connection (the body may be unread)."""
    body = orjson.dumps(exc.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": _with_close(headers)})
    await send({"type": "http.response.body", "body": body})


def body_timeout_error(settings: Settings) -> errors.RequestTimeout:
    """The 408 of a body that did not arrive in time (also what a handler's ClientDisconnect becomes)."""
    return errors.RequestTimeout(f"the request body must arrive within {settings.body_timeout_s:g} s plus its "
                                 f"size at {settings.min_body_rate_bps} bytes/s")

