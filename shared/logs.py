"""Job logs: what a node's job process printed and logged, one capped stream per attempt
(:func:`shared.keys.job_logs_key`), appended by the node and read, or followed, by the job's tenant.

Nodes send batches (``POST /v1/jobs/{id}/logs``), fenced like progress reports by the APPEND_LOGS
script. Users read them as text, one ``<time> <line>`` per line, or as JSON (``GET .../logs``).
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec

from shared import errors, keys
from shared.sse import BLOCK_MS, CountedEventStream
from shared.store import Store
from shared.transitions import TERMINAL
from shared.validation import convert, is_number
from shared.views import rfc3339

MAX_BATCH_LINES = 500  # lines per POST; a node's shipper batches well under the 1 MiB body limit
MAX_LINE_CHARS = 2000  # longer lines are cut (after escaping)
MAX_TIME_CHARS = 40
MAX_ATTEMPT = 2**31
TEXT = "text/plain; charset=utf-8"
# control characters (C0 but tab, DEL, C1) would let a job's output rewrite a reader's terminal
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no", "")


class LogLine(msgspec.Struct, forbid_unknown_fields=True):
    """One line as a node sends it: its text, and when it was written (RFC 3339; absent: on arrival)."""

    line: str
    time: str = ""


class LogBatch(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /v1/jobs/{id}/logs: lines of one attempt, oldest first."""

    attempt: int
    lines: Annotated[list[LogLine], msgspec.Meta(max_length=MAX_BATCH_LINES)]


def clean_line(text: str) -> str:
    """A line as stored: control characters other than tab escaped (``\\x1b``), at most
    :data:`MAX_LINE_CHARS` characters."""
    text = _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text[:MAX_LINE_CHARS])
    return text[:MAX_LINE_CHARS]


def _normal_time(text: str, field: str, now: str) -> str:
    """An RFC 3339 time as every stored time is written (UTC, milliseconds, ``Z``); 422 otherwise."""
    if not text:
        return now
    try:
        stamp = datetime.fromisoformat(text) if len(text) <= MAX_TIME_CHARS else None
        if stamp is None or stamp.tzinfo is None:
            raise ValueError(text)
        return stamp.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (ValueError, OverflowError):
        raise errors.InvalidField("time must be an RFC 3339 time with its offset, e.g. 2026-01-31T12:00:00.000Z",
                                  field=field) from None


async def append_logs(store: Store, node_id: str, job_id: str, body: Any, token_hash: str = "") -> dict[str, Any]:
    """Store a node's batch of log lines for one attempt of a job it holds (or held last, once the job
    ended). With ``token_hash`` the script checks the node's session token first (401, nothing changed)."""
    batch = convert(body, LogBatch)
    if not 1 <= batch.attempt <= MAX_ATTEMPT:
        raise errors.InvalidField("attempt must be a positive integer", field="attempt")
    now = rfc3339(int(time.time() * 1000)) or ""
    args: list[Any] = [job_id, node_id, batch.attempt, token_hash]
    for index, entry in enumerate(batch.lines):
        args += [_normal_time(entry.time, f"lines.{index}.time", now), clean_line(entry.line)]
    reply = await store.run("APPEND_LOGS", args)
    return {"ok": True, "accepted": int(reply[1])}


@dataclass(frozen=True)
class LogQuery:
    """What ``GET /v1/jobs/{id}/logs`` asks for: ``attempt`` (None: the latest that ran), ``tail``
    (None: every line), ``follow``, and ``json`` (``format=json``)."""

    attempt: int | None
    tail: int | None
    follow: bool
    json: bool

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> LogQuery:
        """The query, or 422 naming the parameter at fault."""
        attempt = _whole(params.get("attempt"), "attempt", 1, MAX_ATTEMPT)
        tail = _whole(params.get("tail"), "tail", 1, keys.LOG_MAXLEN)
        follow = params.get("follow", "").lower()
        if follow not in _TRUE + _FALSE:
            raise errors.InvalidField("follow must be 1 or 0", field="follow")
        form = params.get("format", "text")
        if form not in ("text", "json"):
            raise errors.InvalidField("format must be text or json", field="format")
        if form == "json" and follow in _TRUE:
            raise errors.InvalidField("format=json cannot be followed; follow streams text", field="format")
        return cls(attempt, tail, follow in _TRUE, form == "json")


def _whole(raw: str | None, name: str, low: int, high: int) -> int | None:
    if raw is None:
        return None
    if not is_number(raw) or len(raw) > 12 or not low <= int(raw) <= high:
        raise errors.InvalidField(f"{name} must be an integer from {low} to {high}", field=name)
    return int(raw)


async def resolve_attempt(store: Store, job_id: str, wanted: int | None) -> int:
    """The attempt whose log is meant: the one asked for (422 past the job's current attempt), else the
    latest that ran on a node: the current one once a node got it, else the one before (a job whose node
    was lost waits for its next attempt, or failed when attempts ran out)."""
    current_raw = await store.redis.hget(keys.job_key(job_id), "attempt")
    if current_raw is None:
        raise errors.NotFound(f"no job {job_id}")
    current = int(current_raw)
    if wanted is not None:
        if wanted > current:
            raise errors.InvalidField(f"job {job_id} has attempts 1 to {current}", field="attempt")
        return wanted
    if current > 1 and not await store.redis.hexists(keys.job_key(job_id), f"node:{current}"):
        return current - 1
    return current


def _entry(fields: Mapping[str, str]) -> dict[str, str]:
    return {"time": fields.get("time", ""), "line": fields.get("line", "")}


async def read_lines(store: Store, job_id: str, attempt: int, tail: int | None) -> list[dict[str, str]]:
    """The attempt's stored lines, oldest first: all of them, or the last ``tail``."""
    key = keys.job_logs_key(job_id, attempt)
    if tail is None:
        entries = await store.redis.xrange(key, "-", "+")
    else:
        entries = list(reversed(await store.redis.xrevrange(key, "+", "-", count=tail)))
    return [_entry(fields) for _, fields in entries]


def as_text(lines: list[dict[str, str]]) -> bytes:
    """``<time> <line>`` per line."""
    return "".join(f"{entry['time']} {entry['line']}\n" for entry in lines).encode()


async def follow_lines(store: Store, job_id: str, attempt: int, *, explicit: bool,
                       tail: int | None) -> AsyncIterator[bytes]:
    """Text lines of the attempt as they arrive, until no more can come: the job ended (after one last
    wait for lines its node flushes as it exits), or, for an attempt asked for by number, it is no longer
    the job's current one. Without one, the follow moves on to each next attempt of the job, with a line
    ``--- attempt N ---`` between them."""
    last_id = "0-0"
    if tail is not None:
        newest = await store.events.xrevrange(keys.job_logs_key(job_id, attempt), "+", "-", count=tail)
        if newest:
            last_id = newest[0][0]
            yield as_text([_entry(fields) for _, fields in reversed(newest)])
    grace = True  # one blocking read after the job ended: the lines its node sends as it exits
    while True:
        status, current = await store.events.hmget(keys.job_key(job_id), ["status", "attempt"])
        if status is None:
            return  # purged
        over = status in TERMINAL or int(current) != attempt
        block = BLOCK_MS if not over or grace else None
        if over:
            grace = False
        found = await store.events.xread({keys.job_logs_key(job_id, attempt): last_id}, count=500, block=block)
        lines = []
        for _, entries in found or []:
            for entry_id, fields in entries:
                last_id = entry_id
                lines.append(_entry(fields))
        if lines:
            yield as_text(lines)
            continue
        if not over or block is not None:
            continue
        if status in TERMINAL or explicit:
            return
        attempt, last_id, grace = int(current), "0-0", True  # the job moved on to its next attempt
        yield as_text([{"time": rfc3339(int(time.time() * 1000)) or "", "line": f"--- attempt {attempt} ---"}])


class CountedLogStream(CountedEventStream):
    """A followed log (``text/plain``), counted with the event streams (:func:`shared.sse.admit_stream`):
    both hold a connection of the store's stream pool while they wait for what comes next."""

    def __init__(self, store: Store, tenant: str, content: AsyncIterator[bytes]) -> None:
        super().__init__(store, tenant, content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.media_type = TEXT
        self.headers["content-type"] = TEXT
