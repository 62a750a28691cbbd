"""Supervision of the node's job processes: one per slot at most, each watched until it ends.

A process that ends on its own has reported its job's outcome itself (exit 0). One that crashed,
was killed by the OOM killer, hung, or ignored a stop request is reported here: a node fault
(retried on another attempt), or a hand-back when the node was draining. Only then is the job's
stream entry acknowledged, so no job is dropped between receiving and finishing it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from node_runtime.assignments import Assignment
from node_runtime.device import device_for_slot
from node_runtime.executor import JobProcess, exit_codes_readable, job_process_context, start_forkserver
from node_runtime.job_control import JobLaunch, StopReason

if TYPE_CHECKING:
    from node_runtime.agent import NodeAgent, Registration
    from node_runtime.settings import NodeSettings

log = logging.getLogger("cyxwiz.node")
# What a job process holds beyond its own estimate (torch, CUDA libraries and context), per device kind;
# CYXWIZ_NODE_JOB_BASE_MEMORY_MB replaces both.
BASE_MEMORY_MB = {"cpu": 1536, "cuda": 4096}


def job_base_memory_mb(settings: NodeSettings, device: str) -> int:
    if settings.job_base_memory_mb:
        return settings.job_base_memory_mb
    return BASE_MEMORY_MB["cuda" if device.startswith("cuda") else "cpu"]
WATCH_EVERY_S = 0.1
ACK_ATTEMPTS = 20  # an ack that still fails is healed later: the pending entry's job is over when re-read


@dataclass
class RunningJob:
    """A job process together with the assignment and registration it came from."""

    entry: Assignment
    registration: Registration
    slot: int
    process: JobProcess
    finishing: bool = False  # the process ended; its report and ack are under way

    @property
    def name(self) -> str:
        return self.entry.name


class Supervisor:
    """The running jobs of one node runtime and the task that watches them."""

    def __init__(self, agent: NodeAgent, torch_threads: int) -> None:
        self.agent = agent
        self.slots = agent.settings.slots
        self.torch_threads = torch_threads
        self.context = job_process_context(agent.settings.warm_processes)  # started by start()
        self.jobs: dict[tuple[str, int], RunningJob] = {}
        self.capacity_changed = asyncio.Event()
        self._finishing: set[asyncio.Task[None]] = set()

    # --- questions -----------------------------------------------------------------------------
    def _busy(self) -> list[RunningJob]:
        return [job for job in self.jobs.values() if not job.finishing]

    def free_slots(self) -> int:
        return self.slots - len(self._busy())

    def holds(self, entry: Assignment) -> bool:
        return entry.key in self.jobs

    def idle(self) -> bool:
        return not self.jobs

    async def wait_for_free_slot(self) -> None:
        self.capacity_changed.clear()
        if self.free_slots() == 0:
            await self.capacity_changed.wait()

    # --- starting and stopping -----------------------------------------------------------------
    def start(self) -> None:
        """Start warming up job processes (the forkserver's preload: seconds, in the background)."""
        start_forkserver(self.context)

    async def start_job(self, reg: Registration, entry: Assignment, assigned_at: float) -> None:
        """Start a job process for ``entry`` in a free slot; ``assigned_at`` is when the runtime took it."""
        slot = self._free_slot()
        settings = self.agent.settings
        launch = JobLaunch(
            job_id=entry.job_id, attempt=entry.attempt, spec=entry.spec, node_id=reg.node_id,
            api_url=settings.api_url, ca_file=settings.ca_file, session_token=reg.token,
            device=device_for_slot(self.agent.capabilities, slot), torch_threads=self.torch_threads,
            data_root=str(settings.data_root) if settings.data_root else None, allow_http=settings.allow_http,
            assigned_at=assigned_at, retry_max_s=settings.retry_max_s, memory_limit_mb=entry.memory_limit_mb,
            dataset_allow_nets=settings.dataset_allow_nets, dataset_timeout_s=settings.dataset_timeout_s,
            dataset_min_rate_bps=settings.dataset_min_rate_bps, max_dataset_mb=settings.max_dataset_mb,
            task_id=entry.task_id, segment=entry.segment, rank=entry.rank, world_size=entry.world_size,
            own_address=reg.address)
        process = JobProcess(launch, self.context)
        # the slot is taken while it starts; a start cancelled by a shutdown goes on in its thread, and the
        # job is watched (and drained) like the others once it runs
        self.jobs[entry.key] = RunningJob(entry, reg, slot, process)
        await asyncio.to_thread(process.start)
        if process.start_error:
            log.error("%s: %s", entry.name, process.describe_exit())
            return
        log.info("%s (%s): started in slot %d on %s, pid %s", entry.name, entry.spec.get("name", "?"), slot,
                 launch.device, process.pid)

    def _free_slot(self) -> int:
        """A free slot on the least loaded device: the one whose running jobs' memory estimates sum
        lowest (on a multi-GPU node, a job lands where its memory is), then the lowest slot."""
        caps = self.agent.capabilities
        busy = self._busy()
        load: dict[str, int] = {}
        for job in busy:
            device = device_for_slot(caps, job.slot)
            load[device] = load.get(device, 0) + job.entry.memory_limit_mb
        free = set(range(self.slots)) - {job.slot for job in busy}
        return min(free, key=lambda slot: (load.get(device_for_slot(caps, slot), 0), slot))

    def stop_job(self, job_id: str, reg: Registration, reason: StopReason, why: str,
                 attempt: int | None = None) -> None:
        """Stop the job's process (only that attempt's, given ``attempt``)."""
        for job in self.jobs.values():
            if (job.entry.job_id == job_id and not job.entry.task_id and job.registration is reg
                    and not job.finishing and attempt in (None, job.entry.attempt)):
                log.info("%s: stopping: %s", job.name, why)
                job.process.request_stop(reason)

    def stop_all(self, reason: StopReason) -> None:
        for job in self.jobs.values():
            job.process.request_stop(reason)

    def forget_registration(self, old: Registration) -> None:
        """The node was re-registered: jobs of the old registration are no longer ours."""
        for job in self.jobs.values():
            if job.registration is old:
                job.process.request_stop(StopReason.LOST)

    def kill_all(self, why: str) -> None:
        for job in self.jobs.values():
            job.process.kill(why)

    async def wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.jobs and time.monotonic() < deadline:
            await asyncio.sleep(WATCH_EVERY_S)
        return not self.jobs

    # --- watching ------------------------------------------------------------------------------
    async def watch_forever(self) -> None:
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            with exit_codes_readable() as readable:
                # while a job process starts (seconds, while the forkserver preloads) no exit can be seen:
                # a job that ended meanwhile must not be judged, nor a pid the forkserver reaped be killed
                if readable:
                    self._watch_round()

    def _watch_round(self) -> None:
        for job in list(self.jobs.values()):
            if job.finishing or job.process.starting:
                continue
            try:
                if not job.process.ended():
                    job.process.kill_if_asked()  # a kill asked for while a job process was starting
                    self._enforce_limits(job)
                    continue
            except Exception:  # a bug must not stop the watch over the other jobs
                log.exception("%s: unexpected error while watching it", job.name)
                continue
            job.finishing = True
            self.capacity_changed.set()
            task = asyncio.create_task(self._finish(job), name=f"finish {job.name}")
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)

    def _enforce_limits(self, job: RunningJob) -> None:
        process, settings = job.process, self.agent.settings
        if process.stop_reason == StopReason.DRAIN:
            deadline = self.agent.drain_deadline
            if deadline is not None and time.monotonic() > deadline:
                process.kill(f"it did not hand itself back within the drain timeout ({settings.drain_timeout_s:.0f} s)")
            return
        if process.stop_reason != StopReason.NONE:
            if process.seconds_since_stop_request() > settings.cancel_grace_s:
                process.kill(f"it did not stop within {settings.cancel_grace_s:.0f} s of being asked to")
            return
        if self._over_limits(job):
            return
        since_step = process.seconds_since_step()
        if since_step is None and process.seconds_since_start() > settings.startup_timeout_s:
            why = f"it took no first training step within {settings.startup_timeout_s:.0f} s"
        elif since_step is not None and since_step > settings.stall_timeout_s:
            why = f"it took no training step for {settings.stall_timeout_s:.0f} s"
        else:
            return
        log.warning("%s: killing it: %s", job.name, why)
        process.kill(why)

    def _over_limits(self, job: RunningJob) -> bool:
        """Kill a job that outgrew its memory estimate or its wall-clock limit: the job's fault."""
        process = job.process
        limit = job.entry.memory_limit_mb
        if limit:
            base = job_base_memory_mb(self.agent.settings, process.launch.device)
            rss = process.rss_mb()
            if rss is not None and rss > limit + base:
                why = (f"it used {rss} MiB of memory, more than its estimate allows ({limit} MiB, plus {base} MiB "
                       "for the framework); make the job smaller (batch_size, model or dataset)")
                log.warning("%s: killing it: %s", job.name, why)
                process.kill(why, fault="job")
                return True
        max_duration = job.entry.spec.get("training", {}).get("max_duration_s")
        if max_duration and process.seconds_since_start() > max_duration:
            why = f"it ran past its wall-clock limit, training.max_duration_s = {max_duration:.0f} s"
            log.warning("%s: killing it: %s", job.name, why)
            process.kill(why, fault="job")
            return True
        return False

    async def _finish(self, job: RunningJob) -> None:
        """Report what the process could not, then acknowledge its entry and free its slot."""
        process, reason = job.process, job.process.stop_reason
        try:
            if process.exitcode == 0:
                log.info("%s: process ended", job.name)
            elif job.entry.task_id:
                log.warning("%s: %s", job.name, process.describe_exit())
                if reason in (StopReason.NONE, StopReason.DRAIN):
                    await self.agent.report_verification(job.registration, job.entry, {
                        "phase": "handback" if reason == StopReason.DRAIN else "failed",
                        "error": process.describe_exit()})
            else:
                log.warning("%s: %s", job.name, process.describe_exit())
                if reason == StopReason.DRAIN:
                    await self.agent.report(job.registration, job.entry, process.next_seq(), {"status": "queued"})
                elif reason == StopReason.NONE:
                    await self.agent.report(job.registration, job.entry, process.next_seq(),
                                            {"status": "failed", "fault": process.killed_fault,
                                             "error": process.describe_exit()})
            await self._ack(job)
        finally:
            process.reap()
            del self.jobs[job.entry.key]
            self.capacity_changed.set()
            if self.agent.left_by_control_plane and self.idle():
                self.agent.shutdown.set()

    async def _ack(self, job: RunningJob) -> None:
        for attempt in range(ACK_ATTEMPTS):
            try:
                await self.agent.stream.ack(job.entry)
                return
            except (RedisError, OSError) as exc:
                if self.agent.deregistered or self.agent.registration is not job.registration:
                    return  # the node was removed: its stream and store user are gone, nothing to ack
                if attempt == 0:
                    log.warning("%s: cannot acknowledge its assignment yet (%s); retrying", job.name, exc)
                await asyncio.sleep(min(5.0, 0.2 * 2**attempt))
        self.agent.stream.reread_pending()
