"""Job processes as the runtime sees them: start one per job (multiprocessing, spawn context),
ask it to stop, notice when it ends, kill it when it will not.

A job runs in its own process so that a crash, an out-of-memory kill or a hang of one job never
takes the runtime (or the other slots) down. Spawn, not fork: the runtime holds sockets, threads
and an event loop that a forked child must not inherit, and CUDA cannot be used after a fork.
"""

from __future__ import annotations

import multiprocessing
import signal
import time

from node_runtime.job_control import JobControl, JobLaunch, StopReason
from node_runtime.job_process import EXIT_ORPHANED, EXIT_UNSETTLED, job_process_main

_SPAWN = multiprocessing.get_context("spawn")


class JobProcess:
    """One attempt of one job running in a child process."""

    def __init__(self, launch: JobLaunch) -> None:
        self.launch = launch
        self.control = JobControl(_SPAWN)
        self.process = _SPAWN.Process(target=job_process_main, args=(launch, self.control),
                                      name=f"cyxwiz-job-{launch.job_id}")
        self.started_at = 0.0
        self.stop_requested_at: float | None = None
        self.killed_for: str | None = None  # why the runtime killed it, when it did
        self.killed_fault = "node"  # whose fault that kill was: "job" past its memory or wall-clock limit

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def start(self) -> None:
        self.process.start()
        self.started_at = time.monotonic()

    @property
    def stop_reason(self) -> StopReason:
        return self.control.stop_reason

    def request_stop(self, reason: StopReason) -> None:
        """Ask the job to stop before its next training step (a stronger reason replaces a weaker one)."""
        if self.control.request_stop(reason):
            self.stop_requested_at = time.monotonic()

    def seconds_since_stop_request(self) -> float:
        return 0.0 if self.stop_requested_at is None else time.monotonic() - self.stop_requested_at

    def seconds_since_step(self) -> float | None:
        return self.control.seconds_since_step()

    def seconds_since_start(self) -> float:
        return time.monotonic() - self.started_at

    @property
    def exitcode(self) -> int | None:
        """None while it runs."""
        return self.process.exitcode

    def kill(self, why: str, fault: str = "node") -> None:
        """SIGKILL: for a job that ignores a stop request, hangs (the node's problem, as far as anyone
        can tell) or outgrows its limits (``fault`` "job")."""
        if self.process.exitcode is None:
            self.killed_for = why
            self.killed_fault = fault
            self.process.kill()

    def rss_mb(self) -> int | None:
        """The process's resident memory in MiB (Linux /proc), or None when it cannot be read."""
        try:
            with open(f"/proc/{self.process.pid}/status", encoding="ascii") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) // 1024
        except (OSError, ValueError, IndexError):
            return None
        return None

    def reap(self) -> None:
        """Release the process's resources once it has exited."""
        self.process.join(timeout=0)
        self.process.close()

    def describe_exit(self) -> str:
        """A sentence for the job's error when the process ended without reporting."""
        if self.killed_for:
            return f"the job process was killed by the node runtime: {self.killed_for}"
        code = self.exitcode
        if code is None:
            return "the job process is still running"
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            hint = " (out of memory?)" if -code == signal.SIGKILL else ""
            return f"the job process was killed by signal {name}{hint}"
        if code == EXIT_ORPHANED:
            return "the job process lost its node runtime"
        if code == EXIT_UNSETTLED:
            return "the job process ended without an outcome the control plane accepted (see the node's log)"
        return f"the job process exited with code {code} without reporting an outcome"

    def next_seq(self) -> int:
        return self.control.next_seq()
