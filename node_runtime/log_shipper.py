"""A job process's log shipper: what the job prints and logs goes to its log in the control plane
(``POST /v1/jobs/{id}/logs``, docs/logs.md) from a thread of its own, as well as to the real stderr.

Writing a line never waits on the network: lines wait in a bounded queue, and when the API is slower
than the job's output the oldest are dropped and a line saying how many takes their place. The
shipper's own thread never feeds itself (its HTTP client's logging and warnings only reach stderr).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO, cast

from node_runtime.api import STOP_CODES, ApiRefused, ApiUnavailable, Backoff

log = logging.getLogger("cyxwiz.node.logs")
MAX_QUEUED_LINES = 10_000  # lines waiting for the API; past this the oldest are dropped
BATCH_LINES = 500  # the most the control plane takes in one request
BATCH_BYTES = 512 * 1024  # of JSON per request, half the control plane's body limit
MAX_LINE_CHARS = 2000  # the control plane cuts longer lines; cut here, the queue's memory stays bounded
MAX_PARTIAL_CHARS = 8192  # output without a newline is shipped as a line past this
SHIP_EVERY_S = 0.5  # lines wait at most this long unless a batch fills first
FORMAT = "%(levelname)s %(name)s: %(message)s"  # a line's time travels beside it


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LogShipper:
    """Queues lines (:meth:`write`) and sends them in batches with ``send`` from a background thread.

    ``send`` raises :class:`ApiUnavailable` (retried with backoff, unless ``give_up()``) or
    :class:`ApiRefused` (409 for an attempt that is no longer this node's, 401/403/404: the log is no
    longer wanted, and the shipper stops; anything else drops that batch).
    """

    def __init__(self, send: Callable[[list[dict[str, str]]], None], give_up: Callable[[], bool] = lambda: False,
                 *, max_lines: int = MAX_QUEUED_LINES, retry_max_s: float = 10.0) -> None:
        self.send, self.give_up, self.max_lines, self.retry_max_s = send, give_up, max_lines, retry_max_s
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._lines: deque[tuple[float, str]] = deque()
        self._dropped = 0
        self._in_flight = False
        self._closed = False
        self._stopped = False  # refused: nothing more is sent
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._ship_forever, name="log-shipper", daemon=True)
        self.shipped = 0  # lines the control plane took

    def start(self) -> LogShipper:
        self._thread.start()
        return self

    def write(self, text: str) -> None:
        """Queue ``text``, one line per newline in it; returns at once."""
        if threading.current_thread() is self._thread:
            return  # the shipper's own HTTP client logging: shipping it would feed itself
        now = time.time()
        with self._lock:
            if self._stopped or self._closed:
                return
            for line in text.split("\n"):
                if len(self._lines) >= self.max_lines:
                    self._lines.popleft()
                    self._dropped += 1
                self._lines.append((now, line[:MAX_LINE_CHARS]))
            full = len(self._lines) >= BATCH_LINES
        if full:
            self._wake.set()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every line queued so far was sent (or refused); False on timeout."""
        deadline = time.monotonic() + timeout_s
        self._wake.set()
        with self._changed:
            while (self._lines or self._in_flight) and not self._stopped:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._changed.wait(remaining)
        return True

    def close(self, timeout_s: float) -> bool:
        """Flush (within ``timeout_s``), then stop the thread; whether everything got out."""
        done = self.flush(timeout_s)
        with self._lock:
            self._closed = True
        self._wake.set()
        if done:
            self._thread.join(1.0)
        return done

    def _take(self) -> list[tuple[float, str]]:
        """The next batch (the lock held, so only cheap work): at most BATCH_LINES lines and about
        BATCH_BYTES of JSON."""
        batch: list[tuple[float, str]] = []
        size = 0
        if self._dropped:
            batch.append((time.time(), f"[cyxwiz] {self._dropped} lines dropped: the control plane took them "
                                       "too slowly"))
            self._dropped = 0
        while self._lines and len(batch) < BATCH_LINES:
            size += _json_size(self._lines[0][1])
            if batch and size > BATCH_BYTES:
                break
            batch.append(self._lines.popleft())
        return batch

    def _ship_forever(self) -> None:
        batch: list[dict[str, str]] = []
        backoff = Backoff(maximum_s=self.retry_max_s)
        while True:
            if not batch:
                with self._changed:
                    taken = self._take()
                    self._in_flight = bool(taken)
                    if not taken:
                        self._changed.notify_all()
                        if self._closed or self._stopped:
                            return
                batch = [{"time": rfc3339(at), "line": _as_shown(text)} for at, text in taken]
            if not batch:
                self._wake.wait(SHIP_EVERY_S)
                self._wake.clear()
                continue
            try:
                self.send(batch)
                self.shipped += len(batch)
                batch = []
                backoff.reset()
            except ApiUnavailable as exc:
                if self.give_up():
                    self._stop(f"the API is unavailable and the job is over ({exc})")
                    batch = []
                else:
                    time.sleep(backoff.next_delay(exc.retry_after_s))
            except ApiRefused as refusal:
                if refusal.code in STOP_CODES or refusal.status in (401, 403, 404):
                    self._stop(str(refusal))
                else:
                    log.warning("the control plane refused %d log lines: %s", len(batch), refusal)
                batch = []
            except Exception:  # never let the thread die: flush() would wait for nothing
                log.exception("shipping log lines failed")
                batch = []

    def _stop(self, why: str) -> None:
        log.info("log lines are no longer shipped: %s", why)
        with self._changed:
            self._stopped = True
            self._lines.clear()
            self._in_flight = False
            self._changed.notify_all()


def _json_size(text: str) -> int:
    """About how many bytes a line takes in the request's JSON (with its time), never less."""
    if text.isascii() and text.isprintable():
        return len(text) + text.count('"') + text.count("\\") + 64
    return 12 * len(text) + 64  # escaped: up to 12 bytes per character (a surrogate pair)


def _as_shown(text: str) -> str:
    """A line as a terminal shows it: what follows its last carriage return (a progress bar redrawn),
    and valid UTF-8 (a lone surrogate from a decoding error becomes its escape)."""
    text = text.removesuffix("\r")
    if "\r" in text:
        text = text.rsplit("\r", 1)[1]
    try:
        text.encode()
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode()
    return text


class TeeStream:
    """``sys.stdout``/``sys.stderr`` of a job process: writes go to the real stream, and each whole
    line also to the shipper. Everything else (``fileno``, ``isatty``, ``encoding``) is the real stream's."""

    def __init__(self, real: TextIO, shipper: LogShipper) -> None:
        self.real, self.shipper = real, shipper
        self._partial = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        written = self.real.write(text)
        with self._lock:
            head, newline, self._partial = (self._partial + text).rpartition("\n")
            if len(self._partial) > MAX_PARTIAL_CHARS:
                head, newline, self._partial = head + newline + self._partial, "\n", ""
        if newline:
            self.shipper.write(head)
        return written

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.real.flush()

    def ship_rest(self) -> None:
        """Ship output that never got its newline."""
        with self._lock:
            rest, self._partial = self._partial, ""
        if rest:
            self.shipper.write(rest)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class ShippingHandler(logging.Handler):
    """Log records, a line each (a traceback's lines follow its message), to the shipper."""

    def __init__(self, shipper: LogShipper) -> None:
        super().__init__(logging.INFO)
        self.shipper = shipper
        self.setFormatter(logging.Formatter(FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.shipper.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise into the job
            self.handleError(record)


def capture_output(shipper: LogShipper) -> Callable[[], None]:
    """Send the root logger's records (``cyxwiz.*`` loggers propagate to it) and ``sys.stdout``/
    ``sys.stderr`` writes to ``shipper`` as well; returns the function that undoes it. Call after
    ``logging.basicConfig``, whose handler keeps writing to the real stderr, so nothing is shipped twice."""
    handler = ShippingHandler(shipper)
    logging.getLogger().addHandler(handler)
    real_out, real_err = sys.stdout, sys.stderr
    tees = [TeeStream(real, shipper) for real in (real_out, real_err) if real is not None]
    if real_out is not None:
        sys.stdout = cast(TextIO, tees[0])
    if real_err is not None:
        sys.stderr = cast(TextIO, tees[-1])

    def release() -> None:
        for tee in tees:
            tee.ship_rest()
        sys.stdout, sys.stderr = real_out, real_err
        logging.getLogger().removeHandler(handler)

    return release
