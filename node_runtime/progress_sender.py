"""A job process's background sender: intermediate progress reports and checkpoint uploads leave
from their own thread, so a slow or unreachable API never stalls a training step.

Only the newest of each is kept: when the API is slow, older progress reports are coalesced away
and an older checkpoint is replaced by a newer one. Final reports are not sent here; the job process
sends them after :meth:`ProgressSender.flush`, so they always come last and are never dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from node_runtime.api import ApiRefused, ApiUnavailable, Backoff, JobApi
from node_runtime.job_control import JobControl, StopReason

log = logging.getLogger("cyxwiz.node.job")
CHECKPOINT_ARTIFACT = "checkpoint.safetensors"


class ProgressSender:
    """Sends the latest progress report and uploads the latest checkpoint of one attempt."""

    def __init__(self, api: JobApi, control: JobControl, on_refused: Callable[[ApiRefused], None]) -> None:
        self.api, self.control, self.on_refused = api, control, on_refused
        self._changed = threading.Condition()
        self._report: dict[str, Any] | None = None
        self._once: dict[str, Any] = {}  # metrics for the next report delivered, and no other
        self._checkpoint: bytes | None = None
        self._in_flight = False
        self._closed = False
        self._thread = threading.Thread(target=self._send_forever, name="progress-sender", daemon=True)
        self.checkpoints_uploaded = 0
        self.checkpoint_step: int | None = None  # training step of the last checkpoint the control plane has

    def start(self) -> None:
        self._thread.start()

    def send_report(self, report: dict[str, Any]) -> None:
        """Queue a progress report (replacing one not yet sent); returns at once."""
        with self._changed:
            self._report = report
            self._changed.notify_all()

    def send_once(self, metrics: dict[str, Any]) -> None:
        """Add ``metrics`` to the next progress report that gets through, and to no later one (a report
        replaced before it was sent passes them on to the one that replaced it)."""
        with self._changed:
            self._once.update(metrics)

    def save_checkpoint(self, data: bytes) -> None:
        """Queue a checkpoint upload (replacing one not yet uploaded); returns at once."""
        with self._changed:
            self._checkpoint = data
            self._changed.notify_all()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued has been sent (or refused); False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            while self._report is not None or self._checkpoint is not None or self._in_flight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return True

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _abandoned(self) -> bool:
        return self._closed or self.control.stop_reason >= StopReason.CANCEL

    def _send_forever(self) -> None:
        while True:
            with self._changed:
                while self._report is None and self._checkpoint is None and not self._closed:
                    self._changed.wait()
                if self._report is None and self._checkpoint is None:
                    return
                report, self._report = self._report, None
                checkpoint = None
                if report is None:
                    checkpoint, self._checkpoint = self._checkpoint, None
                self._in_flight = True
            try:
                if report is not None:
                    self._send_report(report)
                elif checkpoint is not None:
                    self._upload_checkpoint(checkpoint)
            except ApiUnavailable:
                pass  # a newer item replaced this one, or the job no longer wants it
            except ApiRefused as refusal:
                self.on_refused(refusal)
            except Exception:  # never let the sender die: flush() would then wait forever
                log.exception("job %s: sending a report or checkpoint failed", self.api.job_id)
            finally:
                with self._changed:
                    self._in_flight = False
                    self._changed.notify_all()

    def _send_report(self, report: dict[str, Any]) -> None:
        with self._changed:
            once = dict(self._once)
        if once:
            report = {**report, "metrics": {**report.get("metrics", {}), **once}}
        self._deliver(lambda: self.api.report({**report, "seq": self.control.next_seq()}),
                      superseded=lambda: self._report is not None)
        with self._changed:
            for name, value in once.items():
                if self._once.get(name) == value:
                    del self._once[name]

    def _upload_checkpoint(self, data: bytes) -> None:
        self._deliver(lambda: self.api.upload(CHECKPOINT_ARTIFACT, data),
                      superseded=lambda: self._checkpoint is not None)
        self.checkpoints_uploaded += 1
        self.checkpoint_step = checkpoint_step(data)
        log.info("job %s: uploaded a checkpoint (%d bytes)", self.api.job_id, len(data))

    def _deliver(self, call: Callable[[], object], superseded: Callable[[], bool]) -> None:
        """Retry ``call`` while the API is unavailable, until a newer item supersedes it."""
        backoff = Backoff(maximum_s=self.api.retry_max_s)
        while True:
            try:
                call()
                return
            except ApiUnavailable as exc:
                if superseded() or self._abandoned():
                    raise
                if backoff.failures == 0:
                    log.warning("job %s: the API is unavailable (%s); retrying", self.api.job_id, exc)
                time.sleep(backoff.next_delay(exc.retry_after_s))


def checkpoint_step(data: bytes) -> int | None:
    """The training step a checkpoint was taken at (from its metadata), or None if unreadable."""
    import json

    from node_runtime.training.checkpoints import read_metadata  # the job process has torch loaded already

    try:
        return int(json.loads(read_metadata(data)["position"])["step"])
    except (KeyError, TypeError, ValueError):
        return None
