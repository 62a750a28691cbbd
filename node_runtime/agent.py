"""The node runtime's main loop: register, heartbeat, consume the assignment stream, and leave cleanly.

One asyncio loop holds all state, so no locks: a heartbeat task keeps the node alive and passes on
cancels, a consumer task starts a job process per assignment while a slot is free
(:mod:`node_runtime.supervisor` watches them), and SIGTERM/SIGINT start the drain: take no new work,
stop running jobs at their next step with a checkpoint, hand them back to the queue, deregister,
exit 0. When the control plane no longer knows the node (its heartbeat lapsed while the API or
Redis was away), the node registers again under a new id; the old attempts were requeued.

The node reaches the store only through the URL its registration handed out: a store user of its
own that can read and acknowledge its assignment stream and nothing else. Everything else it asks
the control plane over HTTP. While it cannot read its stream it says so in its heartbeats (it is
not scheduled then) and takes the store's address from the answer, in case the store moved.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from redis.exceptions import RedisError

from node_runtime.api import AgentApi, ApiRefused, ApiUnavailable, Backoff, retry_async
from node_runtime.assignments import Assignment, AssignmentStream, StreamGone
from node_runtime.device import detect_capabilities, gpu_free_mb, threads_per_job
from node_runtime.identity import (
    forget_identity,
    identity_path,
    load_identity,
    load_node_key,
    lock_identity,
    node_key_path,
    save_identity,
    save_node_key,
)
from node_runtime.job_control import StopReason, seq_base
from node_runtime.settings import NodeSettings
from node_runtime.supervisor import Supervisor
from shared.store_users import with_credentials, with_host

log = logging.getLogger("cyxwiz.node")


class RegistrationRefused(Exception):
    """The control plane will never register this node as configured (bad join token, bad body)."""


@dataclass(frozen=True)
class Registration:
    """One registration of this runtime: a node id, its session token and its assignment stream
    (with the URL of the node's own store user)."""

    node_id: str
    token: str
    heartbeat_interval_s: float
    ttl_s: float
    stream: str
    group: str
    redis_url: str
    address: str = ""  # where the other nodes of a multi-node job reach this one (the control plane's view)


class NodeAgent:
    """One node runtime process."""

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.capabilities = detect_capabilities(settings.device)
        self.api = AgentApi(settings.api_url, settings.ca_file)
        self.stream = AssignmentStream()
        self.stream_error: str | None = None  # why the assignment stream cannot be read, while it cannot
        self.store_address: str | None = None  # the store's address as the control plane last gave it
        self.registration: Registration | None = None
        self.backlog: deque[Assignment] = deque()  # received, not yet started (no free slot yet)
        self.registered = asyncio.Event()
        self.accepting = True  # False once draining: no new assignments are started
        self.left_by_control_plane = False  # an admin drained the node: leave once running jobs end
        self.deregistered = False  # the control plane removed the node at its request: no more heartbeats
        self.shutdown = asyncio.Event()
        self.drain_deadline: float | None = None  # monotonic time by which a SIGTERM drain gives up waiting
        self.signals = 0
        self.exit_code = 0
        self.supervisor = Supervisor(self, threads_per_job(settings.slots, settings.torch_threads))
        self.body: dict[str, Any] = {"name": settings.name, "slots": settings.slots,
                                     "capabilities": self.capabilities, "labels": settings.labels}
        if settings.address:
            self.body["address"] = settings.address
        self.identity: Path | None = None
        self.key_path: Path | None = None
        self.identity_lock: IO[bytes] | None = None
        if settings.state_dir is not None:
            path = identity_path(settings.state_dir, settings.name)
            self.identity_lock = lock_identity(path)
            if self.identity_lock is None:
                raise RuntimeError(f"another node runtime named {settings.name!r} runs with {settings.state_dir}: "
                                   "a name is one node identity; start this one with another --name")
            self.identity, self.key_path = path, node_key_path(settings.state_dir, settings.name)

    # --- lifecycle ------------------------------------------------------------------------------
    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or an admin's drain); the process exit code."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        tasks: list[asyncio.Task[None]] = []
        self.supervisor.start()  # only now: a runtime refused at construction (its name in use) never pays it
        try:
            if not await self._register():
                return 0
            tasks = [asyncio.create_task(self._heartbeat_forever(), name="heartbeat"),
                     asyncio.create_task(self.supervisor.watch_forever(), name="supervise")]
            consumer = asyncio.create_task(self._consume_forever(), name="consume")
            await self.shutdown.wait()
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            await self._drain()
            return self.exit_code
        except RegistrationRefused as exc:
            log.error("%s", exc)
            return 2
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.supervisor.kill_all("the node runtime is exiting")
            await self.api.close()
            await self.stream.close()

    def _on_signal(self, signum: int) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info("%s: draining: no new jobs; running jobs checkpoint and go back to the queue",
                     signal.Signals(signum).name)
            self.accepting = False
            self.shutdown.set()
        else:
            log.warning("second signal: stopping job processes now")
            self.supervisor.kill_all("the node runtime was told twice to stop")

    def _backoff(self) -> Backoff:
        return Backoff(0.2, self.settings.retry_max_s)

    async def _sleep_unless_shutdown(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.shutdown.wait(), seconds)
        except TimeoutError:
            pass

    # --- registration and heartbeats -----------------------------------------------------------
    async def _register(self) -> bool:
        """Resume as the node this runtime was before a restart, else register (again), retrying while
        the API is unreachable; False if shut down meanwhile."""
        if await self._resume():
            return True
        node_key = load_node_key(self.key_path) if self.key_path else None
        body = {**self.body, "node_key": node_key} if node_key else self.body
        backoff, warned = Backoff(0.5, self.settings.retry_max_s), False
        while not self.shutdown.is_set():
            try:
                answer = await self.api.register(self.settings.join_token, body)
            except ApiUnavailable as exc:
                if not warned:
                    log.warning("cannot register at %s yet (%s); retrying with backoff", self.settings.api_url, exc)
                    warned = True
                await self._sleep_unless_shutdown(backoff.next_delay(exc.retry_after_s))
                continue
            except ApiRefused as exc:
                if exc.code == "name_in_use":  # our own earlier registration, until its heartbeat lapses
                    if not warned:
                        log.warning("%s; retrying until it lapses", exc.message)
                        warned = True
                    await self._sleep_unless_shutdown(backoff.next_delay())
                    continue
                raise RegistrationRefused(f"the control plane refused to register this node: {exc}") from exc
            if answer.get("node_key") and self.key_path is not None:
                save_node_key(self.key_path, answer["node_key"])
                log.info("new node identity %r: its key is in %s (keep it: only it registers this name again)",
                         self.settings.name, self.key_path)
            assignments = answer["assignments"]
            self.store_address = None  # a new registration's URL has the store's current address
            self.registration = Registration(
                node_id=answer["node_id"], token=answer["session_token"],
                heartbeat_interval_s=float(answer["heartbeat_interval_s"]), ttl_s=float(answer["ttl_s"]),
                stream=assignments["stream"], group=assignments["group"], redis_url=assignments["redis_url"],
                address=str(answer.get("address") or ""))
            await self.stream.use(self._stream_url(self.registration))
            if self.identity is not None:
                save_identity(self.identity, self.settings.api_url, self.body, asdict(self.registration))
            gpus = ", ".join(g["name"] for g in self.capabilities["gpus"]) or "no GPU"
            log.info("registered as %s (%s, %d slot(s), %s, %d CPU cores); heartbeat every %.1f s",
                     answer["node_id"], self.settings.name, self.settings.slots, gpus,
                     self.capabilities["cpu_cores"], self.registration.heartbeat_interval_s)
            self.registered.set()
            self.supervisor.capacity_changed.set()
            return True
        return False

    async def _resume(self) -> bool:
        """Take back the saved registration if the control plane still knows it (a restart within the
        TTL): the node's attempts are still current, and its pending entries are read first."""
        saved = load_identity(self.identity, self.settings.api_url, self.body) if self.identity else None
        if saved is None:
            return False
        try:
            reg = Registration(**saved)
        except TypeError:
            return False
        if "address" not in saved:
            await self._leave_stale(reg)
            return False
        backoff = Backoff(0.5, self.settings.retry_max_s)
        while not self.shutdown.is_set():
            try:
                answer = await self.api.heartbeat(reg.node_id, reg.token, None)
            except ApiUnavailable as exc:
                await self._sleep_unless_shutdown(backoff.next_delay(exc.retry_after_s))
                continue
            except ApiRefused as exc:
                log.info("node %s of an earlier run is gone (%s); registering anew", reg.node_id, exc)
                assert self.identity is not None
                forget_identity(self.identity)
                return False
            if answer.get("status") == "draining":  # the earlier run was stopping; this one is not
                log.info("node %s of an earlier run was draining; registering afresh", reg.node_id)
                assert self.identity is not None
                forget_identity(self.identity)
                return False
            await self.stream.use(self._stream_url(reg))
            self.registration = reg
            log.info("resumed as node %s (%s): its pending assignments restart first", reg.node_id, self.settings.name)
            self.registered.set()
            self.supervisor.capacity_changed.set()
            return True
        return False

    async def _leave_stale(self, reg: Registration) -> None:
        """Give up a saved registration this runtime cannot be (one saved before registrations kept the
        node's address: its gang ranks would not know where the others reach them). DELETE makes it draining,
        and a draining registration gives way to a new one of its name at once, its jobs going back to the
        queue; else the new registration would wait for the old one's heartbeat to lapse."""
        log.info("node %s of an earlier run was saved without its address; leaving it and registering afresh",
                 reg.node_id)
        assert self.identity is not None
        forget_identity(self.identity)
        try:
            await retry_async(lambda: self.api.deregister(reg.node_id, reg.token), give_up=self.shutdown.is_set,
                              backoff=self._backoff())
        except (ApiRefused, ApiUnavailable) as exc:  # gone already, or the API is away: registering decides
            log.info("leaving node %s: %s", reg.node_id, exc)

    async def _heartbeat_forever(self) -> None:
        loop = asyncio.get_running_loop()
        unreachable = False
        while not self.deregistered:
            reg = self.registration
            if reg is None:
                await self.registered.wait()
                continue
            due = loop.time() + reg.heartbeat_interval_s
            gpu_free = await asyncio.to_thread(gpu_free_mb) if self.capabilities["gpus"] else None
            try:
                answer = await self.api.heartbeat(reg.node_id, reg.token, gpu_free, self.stream_error)
            except ApiUnavailable as exc:
                if not unreachable:
                    log.warning("heartbeat failed (%s); retrying every %.1f s", exc, reg.heartbeat_interval_s)
                    unreachable = True
            except ApiRefused as exc:
                if exc.node_unknown:
                    await self._register_again(reg, str(exc))
                    continue
                log.error("heartbeat refused: %s", exc)
            except Exception:  # a bug must not stop the heartbeats: the node would be reaped
                log.exception("unexpected error in the heartbeat loop")
            else:
                if unreachable:
                    log.info("the control plane answers again")
                    unreachable = False
                await self._apply_heartbeat(reg, answer)
            await asyncio.sleep(max(0.0, due - loop.time()))

    def _stream_url(self, reg: Registration) -> str:
        """Where to read the stream: the registration's URL (the node's own store user), at the
        address the control plane last gave if the store moved, on the operator's host override."""
        url = reg.redis_url
        if self.store_address:
            parts = urlsplit(url)
            url = with_credentials(self.store_address, unquote(parts.username or ""), unquote(parts.password or ""))
        if self.settings.store_host:
            override = urlsplit("//" + self.settings.store_host)
            url = with_host(url, override.hostname or "", override.port)
        return url

    async def _apply_heartbeat(self, reg: Registration, answer: dict[str, object]) -> None:
        store_url = answer.get("store_url")
        if isinstance(store_url, str) and self.registration is reg and store_url != self.store_address:
            # we said we cannot read the stream: the store may have moved; reconnect at its address
            log.info("the control plane gives the store's address as %s; reading assignments there", store_url)
            self.store_address = store_url
            await self.stream.use(self._stream_url(reg))
        cancelled = answer.get("cancel") or []
        assert isinstance(cancelled, list)
        for job_id in cancelled:
            self.supervisor.stop_job(str(job_id), reg, StopReason.CANCEL, "cancelled by its user")
        stopped = answer.get("stop") or []
        assert isinstance(stopped, list)
        for entry in stopped:  # a multi-node job's attempt ended elsewhere (another rank failed): stop that attempt
            if isinstance(entry, dict) and isinstance(entry.get("attempt"), int):
                self.supervisor.stop_job(str(entry.get("job_id")), reg, StopReason.LOST,
                                         f"attempt {entry['attempt']} ended on another rank", attempt=entry["attempt"])
        if answer.get("status") == "draining" and not self.shutdown.is_set() and not self.left_by_control_plane:
            log.info("the control plane is draining this node: no new jobs; leaving once running jobs end")
            self.accepting = False
            self.left_by_control_plane = True
        if self.left_by_control_plane and self.supervisor.idle():
            self.shutdown.set()

    async def _register_again(self, old: Registration, why: str) -> None:
        """The control plane forgot this node (a lapsed heartbeat); its attempts were requeued."""
        if self.registration is not old:
            return
        log.warning("the control plane no longer knows node %s (%s); its jobs went back to the queue; "
                    "registering again", old.node_id, why)
        self.registration = None
        self.registered.clear()
        self.backlog.clear()
        self.supervisor.forget_registration(old)
        if self.identity is not None:
            forget_identity(self.identity)
        if self.shutdown.is_set() or self.left_by_control_plane:
            self.shutdown.set()  # an admin's drain removed the node once its last job ended: leave
            return
        try:
            await self._register()
        except RegistrationRefused as exc:
            log.error("%s", exc)
            self.exit_code = 2
            self.shutdown.set()

    # --- assignments ---------------------------------------------------------------------------
    async def _consume_forever(self) -> None:
        """Start assignments while a slot is free: entries already received first, then new ones
        (XREADGROUP BLOCK); after a broken connection, this consumer's pending entries first."""
        backoff, failing = Backoff(0.2, self.settings.retry_max_s), False
        while self.accepting:
            reg = self.registration
            if reg is None:
                await self.registered.wait()
                continue
            if self.supervisor.free_slots() == 0:
                await self.supervisor.wait_for_free_slot()
                continue
            try:
                if not self.backlog:
                    self.backlog.extend(await self.stream.read(reg.stream, reg.group, reg.node_id,
                                                               self.supervisor.free_slots(),
                                                               self.settings.poll_block_ms))
                # a pending re-read can bring more entries than free slots: the rest wait here
                while self.backlog and self.supervisor.free_slots() and self.registration is reg:
                    await self._take(reg, self.backlog.popleft())
            except StreamGone:
                await self._sleep_unless_shutdown(reg.heartbeat_interval_s)  # the heartbeat will re-register
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("the assignment stream is unreachable (%s); reconnecting with backoff, and "
                                "unhealthy (not scheduled) until it is back", exc)
                    failing = True
                self.stream_error = f"{type(exc).__name__}: {exc}"[:200]  # the next heartbeat says so
                self._reread_pending()
                await self._sleep_unless_shutdown(backoff.next_delay())
            except ApiUnavailable:  # asking whether an assignment is current: the API is away
                self._reread_pending()
                await self._sleep_unless_shutdown(backoff.next_delay())
            except Exception:  # a bug must not stop the node from consuming: log it, read again
                log.exception("unexpected error while consuming assignments")
                self._reread_pending()
                await self._sleep_unless_shutdown(backoff.next_delay())
            else:
                self.stream_error = None
                if failing:
                    log.info("the assignment stream is reachable again")
                    failing = False
                    backoff.reset()

    def _reread_pending(self) -> None:
        """Forget entries received but not started: the pending re-read brings them back."""
        self.backlog.clear()
        self.stream.reread_pending()

    async def _take(self, reg: Registration, entry: Assignment) -> None:
        """Start a job process for an entry, or acknowledge an entry whose job is already over."""
        taken_at = time.monotonic()  # the job's startup_s counts from here
        if self.supervisor.holds(entry) or entry.stream != reg.stream:
            return  # a pending entry read again after a reconnect (it runs), or one of an old registration
        if entry.task_id:  # a verification task: its process learns at its first report whether it is current
            if not self.accepting:
                await self.report_verification(reg, entry, {"phase": "handback"})
                await self.stream.ack(entry)
                return
            await self.supervisor.start_job(reg, entry, taken_at)
            return
        if not entry.job_id or not await self.api.attempt_is_current(entry.job_id, entry.attempt, reg.token):
            log.info("assignment %s (job %s attempt %d) is already over; acknowledging it",
                     entry.entry_id, entry.job_id or "-", entry.attempt)
            await self.stream.ack(entry)
            return
        if not self.accepting:
            await self._hand_back_unstarted(reg, entry)
            return
        await self.supervisor.start_job(reg, entry, taken_at)

    async def _hand_back_unstarted(self, reg: Registration, entry: Assignment) -> None:
        await self.report(reg, entry, seq_base(), {"status": "queued"})
        log.info("job %s attempt %d handed back unstarted", entry.job_id, entry.attempt)
        await self.stream.ack(entry)

    async def report(self, reg: Registration, entry: Assignment, seq: int, body: dict[str, object]) -> None:
        """A report the runtime makes itself (the job process could not), retried while the API is away."""
        report = {**body, "attempt": entry.attempt, "seq": seq}
        try:
            await retry_async(lambda: self.api.report(entry.job_id, reg.token, report),
                              give_up=lambda: self.registration is not reg or self._drain_overdue(5.0),
                              backoff=self._backoff())
        except ApiRefused as exc:
            log.info("job %s attempt %d: report %s refused: %s", entry.job_id, entry.attempt, body["status"], exc)
        except ApiUnavailable:
            pass  # re-registered meanwhile: the control plane requeued the attempt itself

    async def report_verification(self, reg: Registration, entry: Assignment, body: dict[str, object]) -> None:
        """A verification task's report the runtime makes itself (hand-back, or its process died)."""
        report = {**body, "attempt": entry.attempt}
        try:
            await retry_async(lambda: self.api.report_verification(entry.task_id, reg.token, report),
                              give_up=lambda: self.registration is not reg or self._drain_overdue(5.0),
                              backoff=self._backoff())
        except ApiRefused as exc:
            log.info("%s: report %s refused: %s", entry.name, body["phase"], exc)
        except ApiUnavailable:
            pass

    # --- leaving -------------------------------------------------------------------------------
    def _drain_overdue(self, slack_s: float = 0.0) -> bool:
        return self.drain_deadline is not None and time.monotonic() > self.drain_deadline + slack_s

    async def _drain(self) -> None:
        """Stop running jobs with a checkpoint, hand them and unread assignments back, deregister;
        all within the drain timeout (then jobs are killed and the control plane's TTL takes over)."""
        self.accepting = False
        self.drain_deadline = time.monotonic() + self.settings.drain_timeout_s
        reg = self.registration
        if reg is None:
            self.supervisor.stop_all(StopReason.LOST)
            await self.supervisor.wait_idle(self.settings.cancel_grace_s + 5)
            return
        removed = await self._deregister(reg, slack_s=0.0) == "removed"
        self.supervisor.stop_all(StopReason.DRAIN)
        log.info("asked %d job process(es) to stop at their next step and hand their jobs back",
                 len(self.supervisor.jobs))
        if not removed:
            await self._hand_back_unread(reg)
        await self.supervisor.wait_idle(self.drain_deadline - time.monotonic() + 10)
        if not removed and self.registration is reg:
            await self._deregister(reg, slack_s=15.0)
        log.info("node %s left the cluster", reg.node_id)

    async def _deregister(self, reg: Registration, slack_s: float) -> str:
        """DELETE the node; ``removed`` once it holds no job, else ``draining``."""
        try:
            status = await retry_async(lambda: self.api.deregister(reg.node_id, reg.token),
                                       give_up=lambda: self.signals > 1 or self._drain_overdue(slack_s),
                                       backoff=self._backoff())
        except ApiRefused as exc:
            if exc.node_unknown:
                self.deregistered = True
                if self.identity is not None:
                    forget_identity(self.identity)
                return "removed"
            log.error("deregistering failed: %s", exc)
            return "draining"
        except ApiUnavailable as exc:
            log.error("could not deregister (%s); the control plane will reap the node after its TTL", exc)
            return "draining"
        log.info("deregistered node %s: %s", reg.node_id, status)
        self.deregistered = status == "removed"
        if self.deregistered and self.identity is not None:
            forget_identity(self.identity)
        return status

    async def _hand_back_unread(self, reg: Registration) -> None:
        """Assignments that arrived but were never started go straight back to the queue."""
        self._reread_pending()
        try:
            while entries := await self.stream.read(reg.stream, reg.group, reg.node_id, 100, None):
                for entry in entries:  # the pending ones first (some still running), then unread ones
                    await self._take(reg, entry)
        except (StreamGone, RedisError, OSError, ApiUnavailable) as exc:
            log.warning("could not read the last assignments (%s); the control plane requeues them "
                        "after the node's TTL", exc)


def run_node(settings: NodeSettings) -> int:
    """Run a node runtime in this process until it is told to stop; the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the job's story
    try:
        agent = NodeAgent(settings)
    except (RuntimeError, ValueError) as exc:  # --device cuda without CUDA, a malformed Redis URL
        log.error("cannot start: %s", exc)
        return 2
    return asyncio.run(agent.run())
