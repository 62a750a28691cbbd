"""What the runtime and one job process share: the launch description (sent once, pickled) and
three shared values (the stop request, the report sequence, the time of the last training step).

Times are CLOCK_MONOTONIC (``time.monotonic()``), which on Linux is one clock for every process of
the host, so a time taken in the runtime can be compared with one taken in the job process."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from typing import Any


class StopReason(enum.IntEnum):
    """Why a job process should stop. Later reasons win over earlier ones (a cancel during a drain
    needs no hand-back; a lost attempt needs nothing at all)."""

    NONE = 0
    DRAIN = 1   # the node is shutting down: checkpoint, then hand the job back to the queue
    CANCEL = 2  # the user cancelled: stop, report nothing (the job is already cancelled)
    LOST = 3    # this attempt is no longer ours (node reaped, attempt stale, job ended): stop silently


@dataclass(frozen=True)
class JobLaunch:
    """Everything a job process needs to run one attempt of one job."""

    job_id: str
    attempt: int
    spec: dict[str, Any]
    node_id: str
    api_url: str
    ca_file: str | None  # CA bundle for an https API with a private CA; None: the system's
    session_token: str
    device: str
    torch_threads: int
    data_root: str | None
    allow_http: bool
    assigned_at: float  # when the runtime took the assignment (monotonic): a job's startup_s counts from it
    retry_max_s: float  # longest wait between retries while the API is unreachable
    memory_limit_mb: int = 0  # the job's memory estimate with its margin; the runtime kills it above this
    dataset_allow_nets: tuple[str, ...] = ()  # see NodeSettings: private networks dataset urls may reach
    dataset_timeout_s: float = 600.0
    dataset_min_rate_bps: float = 16384.0
    max_dataset_mb: int = 1024
    task_id: str = ""  # a verification task (docs/verification.md): replay ``segment`` instead of training
    segment: dict[str, Any] | None = None
    rank: int = 0  # a multi-node job (docs/distributed.md): this process's rank among world_size
    world_size: int = 1
    own_address: str = ""  # where the other ranks reach this node


def seq_base() -> int:
    """Where an attempt's report sequence starts in this process: the wall clock in microseconds, so a
    process that runs the same attempt again after a restart always counts above the one before (the
    control plane drops a report whose seq is not above the attempt's last as a duplicate)."""
    return time.time_ns() // 1000


class JobControl:
    """Values shared between the runtime and a job process (multiprocessing shared memory)."""

    def __init__(self, context: BaseContext) -> None:
        self._stop = context.Value("i", int(StopReason.NONE))
        self._seq = context.Value("q", seq_base())
        self._last_step_at = context.Value("d", 0.0)  # monotonic; 0: no step yet

    @property
    def stop_reason(self) -> StopReason:
        return StopReason(self._stop.value)

    def request_stop(self, reason: StopReason) -> bool:
        """Raise the stop reason to ``reason`` unless a stronger one is set; True if it changed."""
        with self._stop.get_lock():
            if reason <= self._stop.value:
                return False
            self._stop.value = int(reason)
            return True

    def next_seq(self) -> int:
        """The next report sequence number of this attempt (runtime and job process share the counter)."""
        with self._seq.get_lock():
            self._seq.value += 1
            return int(self._seq.value)

    def mark_step(self) -> None:
        self._last_step_at.value = time.monotonic()

    def seconds_since_step(self) -> float | None:
        """Seconds since the last training step, or None before the first one."""
        last = float(self._last_step_at.value)
        return None if last == 0.0 else time.monotonic() - last
