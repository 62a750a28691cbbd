"""Server-sent events of one job: ``progress`` events as they are reported and ``status`` events when
the status changes; the stream closes once the job is terminal and every event has been sent."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from shared import errors, keys
from shared.store import Store
from shared.transitions import TERMINAL

BLOCK_MS = 1000      # one XREAD wait; well under the store's socket timeout
KEEPALIVE_S = 15.0   # a comment line keeps proxies from closing an idle stream


def _frame(event: str, data: Any, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: ".encode() + orjson.dumps(data) + b"\n\n"


def admit_stream(store: Store, tenant: str) -> None:
    """Count a new event stream in, or refuse it (429): a tenant cannot hold every stream of a process."""
    settings = store.settings
    if sum(store.open_streams.values()) >= settings.max_event_streams:
        raise errors.RateLimited("too many open event streams on this server; retry shortly",
                                 headers={"Retry-After": "5"})
    if store.open_streams[tenant] >= settings.max_event_streams_per_tenant:
        raise errors.RateLimited(f"at most {settings.max_event_streams_per_tenant} open event streams per tenant",
                                 headers={"Retry-After": "5"})
    store.open_streams[tenant] += 1


def release_stream(store: Store, tenant: str) -> None:
    """Count a stream out (:class:`CountedEventStream` does, once)."""
    store.open_streams[tenant] -= 1


class CountedEventStream(StreamingResponse):
    """An SSE response that counts its stream out exactly once, however it ends: the stream finished,
    its client left, the store failed mid-stream, or the response was never sent. (A background task
    is skipped when the stream raises: a store stall used to leave a tenant's slots taken until the
    process restarted.) Create it right after :func:`admit_stream` succeeded."""

    def __init__(self, store: Store, tenant: str, content: AsyncIterator[bytes],
                 headers: Mapping[str, str] | None = None) -> None:
        self._release: tuple[Store, str] | None = (store, tenant)  # first: __del__ relies on it
        super().__init__(content, media_type="text/event-stream", headers=headers)

    def release(self) -> None:
        """Count the stream out, once; later calls do nothing."""
        if self._release is not None:
            store, tenant = self._release
            self._release = None
            release_stream(store, tenant)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()

    def __del__(self) -> None:
        self.release()  # never sent (a middleware answered instead): the slot still comes back


async def job_event_stream(store: Store, job_id: str) -> AsyncIterator[bytes]:
    """Yield SSE frames until the job ends: first a ``status`` event with the job's status now (so a
    client knows where the job stands before any progress), then progress events oldest first and a
    ``status`` event at each change."""
    progress_key = keys.job_progress_key(job_id)
    last_id = "0-0"
    last_status = await store.events.hget(keys.job_key(job_id), "status")
    if last_status is None:
        return
    yield _frame("status", {"job_id": job_id, "status": last_status})
    last_sent = time.monotonic()
    while True:
        status = await store.events.hget(keys.job_key(job_id), "status")
        if status is None:
            return
        block = None if status in TERMINAL else BLOCK_MS
        found = await store.events.xread({progress_key: last_id}, count=500, block=block)
        for _, entries in found or []:
            for entry_id, fields in entries:
                last_id = entry_id
                yield _frame("progress", orjson.loads(fields["event"]), entry_id)
                last_sent = time.monotonic()
        if status != last_status:
            last_status = status
            yield _frame("status", {"job_id": job_id, "status": status})
            last_sent = time.monotonic()
        if status in TERMINAL and not found:
            return
        if time.monotonic() - last_sent > KEEPALIVE_S:
            yield b": keep-alive\n\n"
            last_sent = time.monotonic()
