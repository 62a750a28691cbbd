"""Prometheus metrics: the cluster as the store holds it, and this process's request latencies.

``GET /metrics`` (:func:`shared.http.make_app`, admin API key) answers two kinds of metric in the
Prometheus text format (docs/metrics.md lists them):

- **Cluster metrics** are read from the store at scrape time (:func:`read_cluster`, two pipelined round
  trips, no key scans) and turned into families by :class:`ClusterCollector`. Functions keep nothing
  between requests, so any process answers the same; the totals are the counters the Lua scripts keep
  in :data:`shared.keys.STATS`.
- **Process metrics** live in this process's memory: :class:`ProcessMetrics` holds one registry per
  app (never prometheus_client's global one) and the request-latency histogram that the
  :class:`RequestMetrics` middleware fills. Scrape every process to see them all, or let the workers
  of one port share a directory (:class:`ProcessMetrics`).
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import keys
from shared.store import Store
from shared.transitions import JOB_STATUSES, PRIORITY_BANDS, PRIORITY_SCALE, TERMINAL

# The text format every Prometheus since 2.0 reads (prometheus_client's newest, 1.0.0, adds nothing we use).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

NODE_STATUSES = ("online", "unhealthy", "draining", "offline")
# used: jobs held; free: open slots of nodes that take work (online and healthy); unavailable: the other
# nodes' open slots (draining, unhealthy, lapsed). The three add up to every live node's slots.
SLOT_STATES = ("used", "free", "unavailable")
_NODE_FIELDS = ("status", "class", "slots", "running", "health", "last_heartbeat_ms", "ttl_ms")


def node_status(status: str | None, health: str | None, last_heartbeat_ms: str | None, ttl_ms: str | None,
                now_ms: float) -> str:
    """A node's status as the contract shows it; the same rule as :func:`shared.views.node_view`:
    lapsed but not yet reaped is ``offline``, online with a health problem is ``unhealthy``."""
    last = int(last_heartbeat_ms or 0)
    if last and now_ms > last + int(ttl_ms or 0):
        return "offline"
    status = status or "offline"
    return "unhealthy" if status == "online" and health else status


@dataclass(frozen=True)
class ClusterSnapshot:
    """What one scrape read from the store."""

    nodes: Counter[tuple[str, str]]           # (status, class) -> live nodes
    slots: dict[str, int]                     # SLOT_STATES -> slots
    queue: dict[tuple[str, str], int]         # (class, priority) -> placeable queued jobs
    parked: int                               # queued jobs no live node could hold
    jobs: dict[str, int]                      # status -> jobs
    stats: dict[str, str]                     # the scripts' counters (keys.STATS)
    verification_queued: int
    nodes_banned: int


async def read_cluster(store: Store) -> ClusterSnapshot:
    """The cluster's numbers: the counts in one MULTI (so they agree with each other), then the live
    nodes' few fields in one pipeline."""
    async with store.redis.pipeline(transaction=True) as pipe:
        pipe.zrange(keys.NODES_SCORE, 0, -1)
        queue_labels = [(job_class, priority) for job_class in keys.NODE_CLASSES for priority in PRIORITY_BANDS]
        for job_class, priority in queue_labels:
            band = PRIORITY_BANDS[priority]  # scores are band * PRIORITY_SCALE + submission sequence
            pipe.zcount(keys.queue_key(job_class), band * PRIORITY_SCALE, f"({(band + 1) * PRIORITY_SCALE}")
        pipe.zcard(keys.QUEUE_PARKED)
        for status in JOB_STATUSES:
            pipe.zcard(keys.jobs_index_key(None, status))
        pipe.hgetall(keys.STATS)
        pipe.zcard(keys.VERIFY_QUEUE)
        pipe.hlen(keys.NODES_BANNED)
        replies = iter(await pipe.execute())
    node_ids = next(replies)
    queue = {labels: int(next(replies)) for labels in queue_labels}
    parked = int(next(replies))
    jobs = {status: int(next(replies)) for status in JOB_STATUSES}
    stats, verification_queued, nodes_banned = replies

    rows = []
    if node_ids:
        async with store.redis.pipeline(transaction=False) as pipe:
            for node_id in node_ids:
                pipe.hmget(keys.node_key(node_id), _NODE_FIELDS)
            rows = await pipe.execute()
    nodes: Counter[tuple[str, str]] = Counter()
    slots = dict.fromkeys(SLOT_STATES, 0)
    now_ms = time.time() * 1000
    for status, node_class, total, running, health, last, ttl in rows:
        if status is None:
            continue  # removed between the two round trips
        shown = node_status(status, health, last, ttl, now_ms)
        nodes[shown, node_class or "cpu"] += 1
        held = int(running or 0)
        slots["used"] += held
        slots["free" if shown == "online" else "unavailable"] += max(int(total or 0) - held, 0)
    return ClusterSnapshot(nodes=nodes, slots=slots, queue=queue, parked=parked, jobs=jobs, stats=stats,
                           verification_queued=int(verification_queued), nodes_banned=int(nodes_banned))


class ClusterCollector(Collector):
    """The families of one :class:`ClusterSnapshot`. Every known label combination is present (0 when
    nothing is in it), so a query names a series that exists."""

    def __init__(self, snapshot: ClusterSnapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        s = self.snapshot
        nodes = GaugeMetricFamily("cyxwiz_nodes", "Live nodes (registered, not yet reaped) by status and class.",
                                  labels=["status", "class"])
        counts = {(status, node_class): 0 for status in NODE_STATUSES for node_class in keys.NODE_CLASSES}
        counts.update(s.nodes)
        for (status, node_class), count in counts.items():
            nodes.add_metric([status, node_class], count)
        yield nodes
        slots = GaugeMetricFamily("cyxwiz_slots", "Job slots of live nodes: used (jobs held), free (on nodes that "
                                  "take work), unavailable (open, on draining, unhealthy or lapsed nodes).",
                                  labels=["state"])
        for state in SLOT_STATES:
            slots.add_metric([state], s.slots[state])
        yield slots
        queue = GaugeMetricFamily("cyxwiz_queue_jobs", "Queued jobs waiting for a node, by class and priority "
                                  "(parked jobs are not counted here).", labels=["class", "priority"])
        for (job_class, priority), count in s.queue.items():
            queue.add_metric([job_class, priority], count)
        yield queue
        yield GaugeMetricFamily("cyxwiz_queue_parked_jobs", "Queued jobs that no live node could hold, set aside "
                                "until a node that fits registers.", value=s.parked)
        jobs = GaugeMetricFamily("cyxwiz_jobs", "Jobs by status (finished ones until the retention period ends).",
                                 labels=["status"])
        for status, count in s.jobs.items():
            jobs.add_metric([status], count)
        yield jobs
        yield CounterMetricFamily("cyxwiz_jobs_submitted", "Jobs accepted since the store began.",
                                  value=_count(s.stats, "jobs_submitted"))
        finished = CounterMetricFamily("cyxwiz_jobs_finished", "Jobs that reached a final status, by status.",
                                       labels=["status"])
        ended = {field.removeprefix("jobs_finished:") for field in s.stats if field.startswith("jobs_finished:")}
        for status in sorted(ended | TERMINAL):
            finished.add_metric([status], _count(s.stats, "jobs_finished:" + status))
        yield finished
        yield CounterMetricFamily("cyxwiz_reassignments", "Attempts taken back from their node for a new one (node "
                                  "lost, handed back, or result voided by an audit).",
                                  value=_count(s.stats, "reassignments"))
        yield CounterMetricFamily("cyxwiz_nodes_reaped", "Nodes removed after their heartbeat lapsed.",
                                  value=_count(s.stats, "nodes_reaped"))
        yield GaugeMetricFamily("cyxwiz_verification_tasks_queued", "Verification tasks waiting for a verifier.",
                                value=s.verification_queued)
        yield GaugeMetricFamily("cyxwiz_nodes_banned", "Node identities slashed by a failed audit.",
                                value=s.nodes_banned)


def _count(stats: Mapping[str, str], field: str) -> int:
    return int(stats.get(field) or 0)


class ProcessMetrics:
    """One app's own registry (so apps and tests never share series) and its latency histogram.

    Several worker processes behind one port (``hypercorn --workers N``) each answer some scrapes; for
    their histograms to add up, start them with ``PROMETHEUS_MULTIPROC_DIR`` naming an empty directory
    (prometheus_client's multiprocess mode, read when the process starts): each process then writes
    its values there and every scrape sums them all."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_duration = Histogram(
            "cyxwiz_http_request_duration_seconds",
            "Time to answer an HTTP request (streams: until their response started).",
            ["function", "route", "method", "status"], registry=self.registry)
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None

    def collector(self) -> Collector:
        """What a scrape shows: this process's registry, or every worker's values from the directory."""
        if self.multiprocess_dir is None:
            return self.registry
        workers = CollectorRegistry()
        MultiProcessCollector(workers, self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return workers


async def render_metrics(store: Store, process: ProcessMetrics) -> bytes:
    """The /metrics body: the cluster's families read now, then the processes'."""
    cluster = ClusterCollector(await read_cluster(store))
    return generate_latest(cluster) + generate_latest(process.collector())


# --- request latency -------------------------------------------------------------------------

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_CONVERTOR = re.compile(r"\{(\w+):\w+\}")  # "{job_id:job}" -> "{job_id}"
UNMATCHED = "unmatched"


def route_labels(route: BaseRoute) -> tuple[str, str]:
    """(function, route template) of a route: the function is ``<name>`` of an endpoint defined in
    ``functions.<name>.app``, else ``gateway`` (/healthz, /metrics)."""
    module = getattr(getattr(route, "endpoint", None), "__module__", "") or ""
    parts = module.split(".")
    function = parts[1] if len(parts) == 3 and parts[0] == "functions" and parts[2] == "app" else "gateway"
    template = getattr(route, "path", UNMATCHED) + ("/{path}" if isinstance(route, Mount) else "")
    return function, _CONVERTOR.sub(r"{\1}", template)


class RequestMetrics:
    """Pure-ASGI middleware: every HTTP request's duration goes into the process histogram, labelled by
    function, route template (never the raw path: ids would make a series each), method and status.

    It sits outside the edge's limits, so its refusals (503 overloaded, 408) are timed too. A response
    sent in one piece is timed until that piece is handed over; a streamed one (events, log follows,
    downloads) until its response started, so an hour-long stream is not an hour-long request."""

    def __init__(self, app: ASGIApp, *, routes: Sequence[BaseRoute], histogram: Histogram) -> None:
        self.app = app
        self.routes = [(route, route_labels(route)) for route in routes]
        self.histogram = histogram

    def labels_of(self, scope: Scope) -> tuple[str, str]:
        """(function, route) the router will pick: the first full match, else the first route that
        matches all but the method (its 405), else unmatched."""
        partial = None
        for route, labels in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return labels
            if match is Match.PARTIAL and partial is None:
                partial = labels
        return partial or ("gateway", UNMATCHED)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        begun = time.perf_counter()
        function, route = self.labels_of(scope)
        method = scope["method"] if scope["method"] in _METHODS else "other"
        status = "500"  # unless a response starts: the error handler answers 500 outside this middleware
        started: float | None = None
        observed = False

        def observe(at: float) -> None:
            nonlocal observed
            observed = True
            self.histogram.labels(function, route, method, status).observe(at - begun)

        async def timed_send(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = str(message["status"]), time.perf_counter()
            elif message["type"] == "http.response.body" and not observed:
                observe(started if message.get("more_body") and started is not None else time.perf_counter())
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            if not observed:
                observe(started if started is not None else time.perf_counter())
