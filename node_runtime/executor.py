"""Job processes as the runtime sees them: start one per job, ask it to stop, notice when it ends,
kill it when it will not.

A job runs in its own process so that a crash, an out-of-memory kill or a hang of one job never
takes the runtime (or the other slots) down. Never a fork of the runtime itself: it holds sockets,
threads and an event loop that a forked child must not inherit, and CUDA cannot be used after a fork.

Warm processes (the default): job processes are forked from a multiprocessing *forkserver*, a clean
interpreter the runtime starts once, in the background as it starts, which imports torch and the
training code and then only forks (``node_runtime/warm.py``). A job is then running in ~20 ms, where a
fresh interpreter spends 2.5-4 s importing torch and building its first optimizer: longer than a small
job's whole training. One fork per job keeps one process per job; the fork shares the preloaded memory
copy-on-write. The alternative, a spawned process kept waiting per free slot, would hold a private copy
of torch per slot and warm a new one up after every job, competing with the running jobs for the cores.
Cold processes (``--no-warm-processes``): each job is a fresh interpreter (multiprocessing "spawn").

With a forkserver, the runtime learns a job's exit code from the forkserver: if the forkserver is killed
(SIGKILL, the OOM killer; it ignores SIGTERM and SIGINT) its running jobs look ended with code 255, are
reported as node faults and retried. Their processes die with it (job_process.py sets PR_SET_PDEATHSIG),
so the next attempt never trains beside an orphan the runtime can neither see nor kill.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import forkserver
from multiprocessing.context import ForkServerContext, SpawnContext

from node_runtime.job_control import JobControl, JobLaunch, StopReason
from node_runtime.job_process import EXIT_ORPHANED, EXIT_UNSETTLED, job_process_main

# Process.start() runs in a thread (the first fork waits for the forkserver's preload: seconds), while the
# event loop polls exit codes. Both read the same pipes (starting polls the other children too), and a code
# read twice is lost, so they never overlap: a start holds this lock, and the loop reads exit codes (and
# sends kills) only in ``exit_codes_readable``, skipping its round while a start is under way.
_STARTING = threading.RLock()


@contextmanager
def exit_codes_readable() -> Iterator[bool]:
    """Yield True, holding off job starts meanwhile, if no job process is starting now; else False. Only
    while True can an exit be seen, and only then is a running job's pid surely still its own: the
    forkserver reaps a forked job at once, and the kernel may give its pid to another process."""
    if not _STARTING.acquire(blocking=False):
        yield False
        return
    try:
        yield True
    finally:
        _STARTING.release()


def job_process_context(warm: bool) -> ForkServerContext | SpawnContext:
    """The multiprocessing context job processes start in: spawn, or with ``warm`` the forkserver, which
    ``start_forkserver`` starts."""
    if not warm:
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(forkserver_preload())
    return context


def forkserver_preload() -> list[str]:
    """What the forkserver imports before it forks: the warm-up (first: it makes the server ignore
    SIGTERM and SIGINT), then the module every job process runs again as its ``__main__``.

    Python's own "__main__" preload does nothing here (3.11 hands the server no main path), so each job
    would import the runtime's command line code anew: under ``python -m`` that module, by its name; under
    a console script such as ``cyxwiz`` (a file without a module name, whose ``from cyxwiz.cli import
    main`` each job runs again), the module its ``main`` comes from."""
    modules = ["node_runtime.warm"]
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None) or getattr(getattr(main, "main", None), "__module__", None)
    if isinstance(name, str) and name not in ("__main__", "__mp_main__"):
        modules.append(name)
    return modules


def start_forkserver(context: ForkServerContext | SpawnContext) -> None:
    """Start the forkserver of a warm context in the background: its preload takes seconds, registration
    does not wait for it, and a job that arrives meanwhile waits only for the rest of it."""
    if isinstance(context, ForkServerContext):
        threading.Thread(target=forkserver.ensure_running, name="forkserver-start", daemon=True).start()


class JobProcess:
    """One attempt of one job running in a child process."""

    def __init__(self, launch: JobLaunch, context: ForkServerContext | SpawnContext) -> None:
        self.launch = launch
        self.control = JobControl(context)
        self.process = context.Process(target=job_process_main, args=(launch, self.control),
                                       name=f"cyxwiz-job-{launch.job_id}")
        self.started_at = 0.0
        self.start_error: str | None = None  # why it could not be started: reported on the job as a node fault
        self._exitcode: int | None = None
        self.stop_requested_at: float | None = None
        self.killed_for: str | None = None  # why the runtime killed it, when it did
        self.killed_fault = "node"  # whose fault that kill was: "job" past its memory or wall-clock limit
        self._kill_asked: tuple[str, str] | None = None  # (why, fault) of a kill not yet sent

    @property
    def pid(self) -> int | None:
        """None until it has started."""
        pid: int | None = self.process.pid
        return pid

    def start(self) -> None:
        """Start the process. It may block for seconds (a forkserver still preloading): call it in a thread.
        A failure is kept in ``start_error`` (the process then counts as ended), never raised."""
        self.started_at = time.monotonic()
        try:
            with _STARTING:
                self.process.start()
        except Exception as error:  # noqa: BLE001 - out of processes or memory: the job's report says so
            self.start_error = f"{type(error).__name__}: {error}"

    @property
    def starting(self) -> bool:
        return self.pid is None and self.start_error is None

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

    def ended(self) -> bool:
        return self.start_error is not None or self.exitcode is not None

    @property
    def exitcode(self) -> int | None:
        """None while it runs (and before it has started, and while another job process is starting)."""
        if self._exitcode is None:
            with exit_codes_readable() as readable:
                if readable:
                    self._exitcode = self.process.exitcode
        return self._exitcode

    def kill(self, why: str, fault: str = "node") -> None:
        """SIGKILL: for a job that ignores a stop request, hangs (the node's problem, as far as anyone
        can tell) or outgrows its limits (``fault`` "job"). Asked while this or another job process is
        starting, it is sent once the start is over (the next ``kill_if_asked``): until then neither its
        exit nor its pid can be trusted."""
        if self._kill_asked is None:
            self._kill_asked = (why, fault)
        self.kill_if_asked()

    def kill_if_asked(self) -> None:
        """Send the SIGKILL ``kill`` asked for, if the process is still running and it can tell."""
        if self._kill_asked is None or self.pid is None:
            return
        with exit_codes_readable() as readable:
            if readable and self.exitcode is None:
                self.killed_for, self.killed_fault = self._kill_asked
                self.process.kill()

    def rss_mb(self) -> int | None:
        """The process's resident memory in MiB (Linux /proc), or None when it cannot be read. A forked
        job counts the preloaded pages it shares with the forkserver, as a spawned one counts its own."""
        if self.pid is None:
            return None
        try:
            with open(f"/proc/{self.pid}/status", encoding="ascii") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) // 1024
        except (OSError, ValueError, IndexError):
            return None
        return None

    def reap(self) -> None:
        """Release the process's resources once it has exited (or never started)."""
        if self.pid is not None:
            self.process.join(timeout=0)
        self.process.close()

    def describe_exit(self) -> str:
        """A sentence for the job's error when the process ended without reporting."""
        if self.start_error:
            return f"the job process could not be started: {self.start_error}"
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
