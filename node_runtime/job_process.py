"""What runs inside a job's child process: one attempt of one job, from the checkpoint of an earlier
attempt (if any) to uploaded weights and the final report.

The process exits 0 once the job's end is in the control plane's hands: completed, failed, handed
back, or no longer ours (cancelled, stale attempt, node reaped). Any other exit (a crash, a kill by
the OOM killer) is for the runtime to report as a node fault.
"""

from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node_runtime.api import STOP_CODES, ApiRefused, ApiUnavailable, JobApi
from node_runtime.job_control import JobControl, JobLaunch, StopReason
from node_runtime.log_shipper import LogShipper, capture_output
from node_runtime.progress_sender import CHECKPOINT_ARTIFACT, ProgressSender, checkpoint_step

if TYPE_CHECKING:
    from node_runtime.training.context import Distributed

log = logging.getLogger("cyxwiz.node.job")
MODEL_ARTIFACT = "model.safetensors"
EXIT_ORPHANED = 70  # the runtime died: this attempt will be requeued once the node's TTL lapses
EXIT_UNSETTLED = 71  # ended with no outcome in the control plane's hands: the runtime reports a node fault
EARLY_STEPS = 3  # out of memory before this many steps: loading the data or the first batches did it
RENDEZVOUS_TIMEOUT_S = 120.0  # a gang's ranks wait this long for each other (as the control plane's default)
RENDEZVOUS_POLL_S = (0.2, 2.0)  # a rank > 0 asks whether rank 0 published its store: first wait, longest wait
LOG_FLUSH_S = 10.0  # how long the job's log may take to get out before its final report, and at exit
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
OOM_SCORE_ADJ = "1000"  # the OOM killer's first choice on the host: a job process, never its runtime


def is_out_of_memory(error: BaseException) -> bool:
    """Python's MemoryError, torch's OutOfMemoryError (CUDA) or its CPU allocator's refusal."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and ("can't allocate memory" in str(error) or "out of memory" in str(error))


def job_process_main(launch: JobLaunch, control: JobControl) -> None:
    """Entry point of the child process (forked from the warm forkserver, or spawned: executor.py)."""
    # Ctrl-C in a terminal and `systemctl stop` signal every process of the group or unit; the runtime
    # alone decides when a job stops: its drain asks the job to save its exact position and hand it back.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_forkserver()
    _exit_with_runtime()
    _first_for_the_oom_killer()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    api = JobApi(launch.api_url, launch.session_token, launch.job_id, launch.attempt, launch.retry_max_s,
                 ca_file=launch.ca_file)
    shipping: _ShippedLog | None = None
    if launch.task_id:  # a verification task keeps no log: its attempt numbers are not the job's
        from node_runtime.replay import ReplayAttempt

        api.client.headers["X-CyxWiz-Task"] = launch.task_id  # the task is what lets it read the job's artifacts
        attempt: JobAttempt | ReplayAttempt = ReplayAttempt(launch, control, api)
    else:
        shipping = _ShippedLog(launch, control)
        attempt = JobAttempt(launch, control, api, shipping.shipper)
    try:
        attempt.run()
    except Exception:
        log.exception("job %s attempt %d: the job process failed", launch.job_id, launch.attempt)
        raise
    finally:
        api.close()
        if shipping is not None:
            shipping.close()
    if not attempt.settled and control.stop_reason == StopReason.NONE:
        sys.exit(EXIT_UNSETTLED)  # e.g. a report refused for a reason that does not end the attempt


class _ShippedLog:
    """The job's log in the control plane: this process's logging and output, sent by a LogShipper
    with an HTTP client of its own (a slow log never holds up a report)."""

    def __init__(self, launch: JobLaunch, control: JobControl) -> None:
        self.api = JobApi(launch.api_url, launch.session_token, launch.job_id, launch.attempt, launch.retry_max_s,
                          ca_file=launch.ca_file)
        self.shipper = LogShipper(self.api.append_logs, give_up=lambda: control.stop_reason >= StopReason.CANCEL,
                                  retry_max_s=launch.retry_max_s).start()
        self.release = capture_output(self.shipper)

    def close(self) -> None:
        self.release()
        if not self.shipper.close(LOG_FLUSH_S):
            log.warning("job %s: the end of its log could not be sent", self.api.job_id)
        self.api.close()


def _exit_with_runtime() -> None:
    """Exit as soon as the runtime is gone (SIGKILL leaves it no chance to stop us).

    multiprocessing hands the child the read end of a pipe whose write end only the runtime holds (until
    it reaps the child), also when a forkserver forked the child: it reads end-of-file the moment the
    runtime dies, however it died. The parent pid would not tell: a forked job's parent is the
    forkserver, and an orphan's new parent is whichever process adopts it."""
    runtime = multiprocessing.parent_process()
    if runtime is None:
        return

    def watch() -> None:
        runtime.join()
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="runtime-watch", daemon=True).start()


def _die_with_forkserver() -> None:
    """A job forked from the forkserver dies with it (Linux; elsewhere nothing changes).

    The runtime learns a forked job's exit only from the forkserver: once the server is gone (SIGKILL, the
    OOM killer) the job looks ended, its slot is freed and the next job starts there, maybe the next
    attempt of this very job. A job left running would train beside it unseen, and the runtime could not
    even kill it (its process handle already holds an exit code)."""
    warm = sys.modules.get("node_runtime.warm")  # only the forkserver imports it (its preload)
    server = getattr(warm, "SERVER_PID", None)
    if server is None or server == os.getpid() or not sys.platform.startswith("linux"):
        return  # spawned: the runtime is the parent and sees the exit itself
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    except (OSError, AttributeError) as error:
        log.warning("this job process cannot be tied to its forkserver: %s", error)
        return
    if os.getppid() != server:  # the server died between the fork and the prctl: nobody would signal us
        os._exit(EXIT_ORPHANED)


def _first_for_the_oom_killer() -> None:
    """Make this process the one the kernel's OOM killer picks over the runtime and the forkserver (jobs
    are strangers' workloads; the runtime's loss would cost every slot). Raising it needs no privilege."""
    try:
        Path("/proc/self/oom_score_adj").write_text(OOM_SCORE_ADJ)
    except OSError:
        pass  # not Linux, or /proc not mounted: the kernel's own choice (the largest process) stands


class JobAttempt:
    """One attempt: resume, train, upload, report."""

    def __init__(self, launch: JobLaunch, control: JobControl, api: JobApi, logs: LogShipper | None = None) -> None:
        self.launch, self.control, self.api, self.logs = launch, control, api, logs
        self.sender = ProgressSender(api, control, self._refused)
        self.job = f"job {launch.job_id} attempt {launch.attempt}"
        self.resumed_from_step = 0  # where this attempt started: the chaos run checks it never goes back
        self.settled = False  # True once the outcome (completed, failed, handed back) was accepted
        self.steps = 0  # training steps this attempt has taken (an out-of-memory before EARLY_STEPS is the job's)
        self.commitment: dict[str, Any] | None = None  # digests of the latest checkpoint, sent with each report
        self.startup_s: float | None = None  # from the runtime's taking the assignment to the first training step
        # a multi-node job (docs/distributed.md): rank 0 reports, uploads and ends the attempt; other ranks
        # train and only ever report their own failure
        self.rank, self.distributed = launch.rank, launch.world_size > 1

    def run(self) -> None:
        from node_runtime.training import JobError, TrainingContext, run_training  # torch loads here, in the child
        from node_runtime.training.context import PeerLost, RendezvousTimeout

        self.sender.start()
        if self.rank == 0:
            self.sender.send_report({"status": "running", "epoch": 0, "step": 0, "total_steps": 0, "metrics": {}})
        try:
            checkpoint = self._download_checkpoint()
        except ApiRefused as refusal:
            return self._refused(refusal)
        except ApiUnavailable:
            return  # stopped while the API was away
        if self.control.stop_reason != StopReason.NONE:
            return self._stopped(trained=False)
        ctx = TrainingContext(
            report=self._progress, should_stop=self._should_stop, save_checkpoint=self._checkpoint,
            initial_checkpoint=checkpoint, data_root=Path(self.launch.data_root) if self.launch.data_root else None,
            allow_http=self.launch.allow_http, device=self.launch.device, cpu_threads=self.launch.torch_threads,
            dataset_allow_nets=self.launch.dataset_allow_nets, dataset_timeout_s=self.launch.dataset_timeout_s,
            dataset_min_rate_bps=self.launch.dataset_min_rate_bps, max_dataset_mb=self.launch.max_dataset_mb,
            stop_reason=lambda: int(self.control.stop_reason), distributed=self._distributed())
        _cap_gpu_memory(self.launch)
        started = time.monotonic()
        try:
            result = run_training(self.launch.spec, ctx)
        except ApiRefused as refusal:  # the rendezvous refused: the attempt is over (stale, cancelled)
            return self._refused(refusal)
        except (PeerLost, RendezvousTimeout) as error:  # another rank's fault: it pays, not this node
            if self._abandoned():
                return
            log.error("%s: %s", self.job, error)
            return self._final({"status": "failed", "fault": "peer", "error": f"rank {self.rank}: {error}"})
        except JobError as error:
            log.error("%s failed: %s", self.job, error)
            return self._final({"status": "failed", "error": str(error), "fault": "job"})
        except Exception as error:  # out of memory, a driver error: another node may well succeed
            if is_out_of_memory(error) and self.steps < EARLY_STEPS:
                # the job asked for more than it said it needed, before it could even train: its fault
                log.error("%s ran out of memory after %d steps: %s", self.job, self.steps, error)
                return self._final({"status": "failed", "fault": "job",
                                    "error": f"out of memory while loading data or in its first steps "
                                             f"({type(error).__name__}): make the job smaller"})
            log.exception("%s crashed", self.job)
            return self._final({"status": "failed", "error": f"{type(error).__name__}: {error}", "fault": "node"})
        if result.status == "stopped":  # in a gang, a drain of any rank hands the job back
            reason = StopReason(max(int(self.control.stop_reason), result.stop_reason))
            return self._stopped(result.epoch, result.step, result.total_steps, reason)
        if self.rank > 0:  # rank 0 uploads the weights and reports the outcome for the gang
            return self._leave_it_to_rank_0("done")
        log.info("%s trained in %.1f s: %s", self.job, time.monotonic() - started,
                 {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)})
        self.sender.flush()
        try:
            self.api.retrying(lambda: self.api.upload(MODEL_ARTIFACT, result.weights), give_up=self._abandoned)
        except ApiRefused as refusal:
            if refusal.status == 413:
                return self._final({"status": "failed", "fault": "job",
                                    "error": f"the trained weights ({len(result.weights)} bytes) are larger than "
                                             f"the control plane accepts: {refusal.message}"})
            return self._refused(refusal)
        except ApiUnavailable:
            return
        self._final({"status": "completed", "epoch": result.epoch, "step": result.step,
                     "total_steps": result.total_steps, "metrics": finite_metrics(result.metrics),
                     "artifacts": [MODEL_ARTIFACT]})

    def _download_checkpoint(self) -> bytes | None:
        """The job's latest checkpoint: of an earlier attempt, or of this one before a node restart."""
        data = self.api.download(CHECKPOINT_ARTIFACT, give_up=self._abandoned)
        if data is not None:
            self.resumed_from_step = checkpoint_step(data) or 0
            log.info("%s resumes from a checkpoint at step %d", self.job, self.resumed_from_step)
        return data

    # --- the training run's callbacks (training thread) --------------------------------------
    def _progress(self, progress: dict[str, Any]) -> None:
        self.control.mark_step()
        metrics = {**finite_metrics(progress["metrics"]), "resumed_from_step": self.resumed_from_step}
        if self.sender.checkpoint_step is not None:
            metrics["checkpoint_step"] = self.sender.checkpoint_step
        report = {"status": "running", **progress, "metrics": metrics}
        if self.commitment is not None:
            report["commitment"] = self.commitment
        self.sender.send_report(report)

    def _should_stop(self) -> bool:
        """Called by the training loop before each step (and validation batch)."""
        if self.startup_s is None:  # the first call: the job is ready to take its first step
            self.startup_s = round(time.monotonic() - self.launch.assigned_at, 3)
            self.sender.send_once({"startup_s": self.startup_s})  # with the next report that gets through
            if self.distributed:  # and a gang's process group has formed
                self._say_ready()
        self.steps += 1
        self.control.mark_step()
        return self.control.stop_reason != StopReason.NONE

    # --- the rendezvous of a multi-node job (docs/distributed.md) -------------------------------
    def _distributed(self) -> Distributed | None:
        if not self.distributed:
            return None
        from node_runtime.training.context import Distributed

        return Distributed(rank=self.rank, world_size=self.launch.world_size, own_address=self.launch.own_address,
                           publish_master=self._publish_master, find_master=self._find_master,
                           timeout_s=RENDEZVOUS_TIMEOUT_S)

    def _publish_master(self, port: int) -> None:
        self.api.retrying(lambda: self.api.rendezvous(0, port=port), give_up=self._abandoned)

    def _find_master(self, timeout_s: float) -> tuple[str, int]:
        """Arrive, then poll until rank 0 has published its store; RendezvousTimeout past the deadline
        (also while the API is unavailable: each call is retried, honouring Retry-After, until then)."""
        from node_runtime.training.context import RendezvousTimeout

        deadline = time.monotonic() + timeout_s

        def give_up() -> bool:
            return self._abandoned() or time.monotonic() > deadline

        wait_s, longest_s = RENDEZVOUS_POLL_S
        try:
            state = self.api.retrying(lambda: self.api.rendezvous(self.rank), give_up=give_up)
            while not state.get("master"):
                if give_up():
                    break
                time.sleep(max(0.0, min(wait_s, deadline - time.monotonic())))
                wait_s = min(2 * wait_s, longest_s)
                state = self.api.retrying(lambda: self.api.read_rendezvous(self.rank), give_up=give_up)
        except ApiUnavailable as error:
            raise RendezvousTimeout(f"the control plane did not answer before the deadline ({error})") from error
        if not state.get("master"):
            raise RendezvousTimeout(f"rank 0 did not publish its store within {timeout_s:.0f} s")
        host, _, port = str(state["master"]).rpartition(":")
        return host.strip("[]"), int(port)

    def _say_ready(self) -> None:
        """Tell the control plane this rank's process group formed (its deadline counts the ranks that did).
        Retried while the API is unavailable, for as long as the rendezvous may take: by then the control
        plane has decided without it, and training goes on until told to stop."""
        deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
        try:
            self.api.retrying(lambda: self.api.rendezvous(self.rank, ready=True),
                              give_up=lambda: self._abandoned() or time.monotonic() > deadline)
        except ApiRefused as refusal:  # the attempt is over (stale, cancelled): the next stop check ends it
            self._refused(refusal)
        except ApiUnavailable as error:
            if not self._abandoned():
                log.warning("%s: could not say rank %d is ready: %s", self.job, self.rank, error)

    def _checkpoint(self, data: bytes) -> None:
        if self.control.stop_reason < StopReason.CANCEL:  # a cancelled or lost attempt keeps nothing
            from node_runtime.training.checkpoints import read_metadata, state_digests

            # commit to it in the reports from now on, whether or not the upload gets through
            step = checkpoint_step(data)
            if step is not None:
                self.commitment = {"step": step, **state_digests(data), "data": read_metadata(data).get("data", "")}
            self.sender.save_checkpoint(data)

    # --- endings ------------------------------------------------------------------------------
    def _abandoned(self) -> bool:
        return self.control.stop_reason >= StopReason.CANCEL

    def _stopped(self, epoch: int = 0, step: int = 0, total_steps: int = 0,
                 reason: StopReason | None = None, trained: bool = True) -> None:
        """Stopped before the next step (``trained``) or before training began."""
        reason = self.control.stop_reason if reason is None else reason
        if self.rank > 0 and reason == StopReason.DRAIN and not trained:
            # the gang has not formed, so rank 0 cannot stop with it and hand the job back: this rank does
            # (no attempt spent), or the rendezvous deadline would fail the attempt as this node's fault
            log.info("%s: rank %d stopped before training for the node's shutdown; handing it back",
                     self.job, self.rank)
            return self._final({"status": "queued"})
        if self.rank > 0:  # rank 0 saved the gang's position and hands the job back
            return self._leave_it_to_rank_0(f"stopped at step {step} ({reason.name.lower()})")
        if reason == StopReason.DRAIN:
            self.sender.flush()  # the checkpoint of the exact position is uploaded before the hand-back
            log.info("%s stopped at step %d for the node's shutdown; handing it back", self.job, step)
            self._final({"status": "queued", "epoch": epoch, "step": step, "total_steps": total_steps})
        else:
            log.info("%s stopped at step %d (%s)", self.job, step, reason.name.lower())

    def _leave_it_to_rank_0(self, what: str) -> None:
        """A rank > 0 ends quietly: rank 0 reports the gang's outcome (completed, handed back)."""
        log.info("%s: rank %d %s", self.job, self.rank, what)
        self.settled = True

    def _final(self, body: dict[str, Any]) -> None:
        """Send a final report after everything queued before it; retried until delivered or refused."""
        self.sender.flush()
        self.sender.close()
        if self.logs is not None:  # the log first, while the attempt is surely current: a failure's traceback
            self.logs.flush(LOG_FLUSH_S)
        if self._abandoned():
            return
        report = {**body, "seq": self.control.next_seq()}  # one seq for every retry: the API dedupes
        try:
            answer = self.api.retrying(lambda: self.api.report(report), give_up=self._abandoned)
        except ApiRefused as refusal:
            return self._refused(refusal)
        except ApiUnavailable:
            return
        self.settled = True
        log.info("%s reported %s (job is now %s)", self.job, body["status"], answer.get("status"))

    def _refused(self, refusal: ApiRefused) -> None:
        """A refusal from the control plane: stop when it means the attempt is no longer ours."""
        if refusal.code == "job_cancelled":
            reason = StopReason.CANCEL
        elif refusal.code in STOP_CODES or refusal.status in (401, 403, 404):
            reason = StopReason.LOST
        else:
            log.warning("%s: the control plane refused a report: %s", self.job, refusal)
            return
        if self.control.request_stop(reason):
            log.info("%s stops: %s", self.job, refusal.message)


def _cap_gpu_memory(launch: JobLaunch) -> None:
    """On a GPU, hold the job to its memory estimate (with room for the allocator's caching and the
    libraries' workspaces): past it, torch raises OutOfMemoryError instead of starving a neighbour."""
    if not launch.memory_limit_mb or not launch.device.startswith("cuda"):
        return
    import torch

    try:
        index = torch.device(launch.device).index or 0
        total = torch.cuda.get_device_properties(index).total_memory
        allowed = max(launch.memory_limit_mb * 1.5, launch.memory_limit_mb + 1024) * 2**20
        torch.cuda.set_per_process_memory_fraction(min(1.0, allowed / total), index)
    except Exception:  # noqa: BLE001 - a cap that cannot be set must not stop the job
        log.warning("job %s: could not cap its GPU memory", launch.job_id, exc_info=True)


def finite_metrics(metrics: dict[str, Any]) -> dict[str, float | int | None]:
    """Metrics as JSON can carry them: NaN and infinities become None."""
    clean: dict[str, float | int | None] = {}
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        clean[name] = value if isinstance(value, int) or math.isfinite(value) else None
    return clean
