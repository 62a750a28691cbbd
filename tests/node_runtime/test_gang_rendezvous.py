"""A gang rank's side of the rendezvous when the API misbehaves, and a member drained before training:
a job process's rendezvous calls (``JobAttempt``, in this process) against the real control plane
through a proxy that answers 503s, and real node runtimes for the drain."""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from node_runtime.api import JobApi
from node_runtime.job_control import JobControl, JobLaunch, StopReason
from node_runtime.job_process import JobAttempt
from node_runtime.training.context import RendezvousTimeout
from shared import keys
from tests.conftest import KeepAlive, bearer, start_gateway
from tests.functions.test_rendezvous import GANG_SPEC, placed_gang, rendezvous
from tests.node_runtime.api_proxy import ApiProxy, ProxiedNodes, Seen
from tests.node_runtime.node_harness import Api, wait_until
from tests.node_runtime.test_gang import gang_digits

pytestmark = pytest.mark.timeout(120)

RETRY_MAX_S = 2.0  # the job processes' longest wait between retries here (Retry-After is capped at it)
MakeAttempt = Callable[[str, dict[str, Any], int], JobAttempt]


@pytest.fixture()
def gang(http: httpx.Client, creds: dict[str, str], api_url: str) -> Iterator[tuple[str, dict[int, dict[str, Any]]]]:
    """A 2-node job placed on two nodes registered over HTTP (this test plays their runtimes and keeps them
    alive): (job id, {rank: registration})."""
    job_id, ranks = placed_gang(http, creds)
    with KeepAlive(api_url, list(ranks.values())):
        yield job_id, ranks


@pytest.fixture()
def proxy(api_url: str) -> Iterator[ApiProxy]:
    proxy = ApiProxy(api_url)
    yield proxy
    proxy.close()


@pytest.fixture()
def job_attempt(proxy: ApiProxy) -> Iterator[Callable[[str, dict[str, Any], int], JobAttempt]]:
    """``job_attempt(job_id, registration, rank)``: what a job process of ``rank`` runs, talking to the
    control plane through ``proxy``; its HTTP client is closed after the test."""
    made: list[JobAttempt] = []

    def make(job_id: str, registration: dict[str, Any], rank: int) -> JobAttempt:
        launch = JobLaunch(job_id=job_id, attempt=1, spec=GANG_SPEC, node_id=registration["node_id"],
                           api_url=proxy.url, ca_file=None, session_token=registration["session_token"],
                           device="cpu", torch_threads=1, data_root=None, allow_http=False,
                           assigned_at=time.monotonic(), retry_max_s=RETRY_MAX_S, rank=rank, world_size=2,
                           own_address=registration["address"])
        api = JobApi(launch.api_url, launch.session_token, job_id, 1, RETRY_MAX_S)
        made.append(JobAttempt(launch, JobControl(multiprocessing.get_context("fork")), api))
        return made[-1]

    yield make
    for attempt in made:
        attempt.control.request_stop(StopReason.LOST)  # a call still retrying gives up
        attempt.api.close()


def rendezvous_calls(job_id: str, method: str, ready: bool | None = None) -> Any:
    def match(seen: Seen) -> bool:
        return (seen.method == method and seen.path.startswith(f"/v1/jobs/{job_id}/rendezvous")
                and (ready is None or (seen.body or {}).get("ready") == ready))
    return match


def test_a_rank_says_ready_through_an_unavailable_api(
        gang: tuple[str, dict[int, dict[str, Any]]], job_attempt: MakeAttempt, proxy: ApiProxy, r: redis.Redis) -> None:
    """One 503 must not lose the ready: the deadline would fail the attempt and charge this node."""
    job_id, ranks = gang
    proxy.refuse(rendezvous_calls(job_id, "POST", ready=True), retry_after_s=0)
    job_attempt(job_id, ranks[1], 1)._say_ready()
    assert [seen.status for seen in proxy.requests(rendezvous_calls(job_id, "POST", ready=True))] == [503, 200]
    assert r.hexists(keys.job_rendezvous_key(job_id), "ready:1")


def test_a_refused_ready_stops_the_attempt(gang: tuple[str, dict[int, dict[str, Any]]], job_attempt: MakeAttempt,
                                           http: httpx.Client, creds: dict[str, str]) -> None:
    """A ready refused because the attempt is over (here: cancelled) stops the rank, as any other refusal."""
    job_id, ranks = gang
    assert http.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(creds["api_key"])).status_code == 202
    attempt = job_attempt(job_id, ranks[1], 1)
    attempt._say_ready()
    assert attempt.control.stop_reason == StopReason.CANCEL


def test_a_rank_waiting_for_rank_0_honours_retry_after(
        gang: tuple[str, dict[int, dict[str, Any]]], job_attempt: MakeAttempt, proxy: ApiProxy,
        http: httpx.Client) -> None:
    """Polled while rank 0 has not published its store, an overloaded API's Retry-After is waited out."""
    job_id, ranks = gang
    retry_after_s = 1.5
    proxy.refuse(rendezvous_calls(job_id, "GET"), retry_after_s=retry_after_s)
    found: list[tuple[str, int]] = []
    rank_1 = threading.Thread(target=lambda: found.append(job_attempt(job_id, ranks[1], 1)._find_master(60)))
    rank_1.start()
    polls = wait_until(lambda: len(calls := proxy.requests(rendezvous_calls(job_id, "GET"))) >= 2 and calls, 30,
                       what="rank 1 to poll again after the 503")
    assert rendezvous(http, ranks[0]["session_token"], job_id, attempt=1, rank=0, port=29500).status_code == 200
    rank_1.join(30)
    assert found == [(ranks[0]["address"], 29500)]
    assert polls[0].status == 503 and polls[1].at - polls[0].answered_at >= retry_after_s


def test_the_first_arrival_gives_up_at_the_rendezvous_deadline(
        gang: tuple[str, dict[int, dict[str, Any]]], job_attempt: MakeAttempt, proxy: ApiProxy) -> None:
    """An API that never answers the arrival is waited for until the deadline, not for ever."""
    job_id, ranks = gang
    proxy.refuse(rendezvous_calls(job_id, "POST"), times=10**6)
    attempt = job_attempt(job_id, ranks[1], 1)
    outcome: list[BaseException] = []

    def find() -> None:
        try:
            attempt._find_master(1.0)
        except BaseException as error:  # noqa: BLE001 - what it raised is the test's answer
            outcome.append(error)

    rank_1 = threading.Thread(target=find, daemon=True)
    rank_1.start()
    try:
        rank_1.join(30)  # the deadline (1 s), and one more try at most RETRY_MAX_S later
        assert not rank_1.is_alive(), "still trying after the deadline"
        assert len(outcome) == 1 and isinstance(outcome[0], RendezvousTimeout), outcome
    finally:
        attempt.control.request_stop(StopReason.LOST)  # let it go whatever happened
        rank_1.join(30)


DEADLINE_S = 60  # this test's rendezvous deadline: only an attempt the drained rank fails waits for it


@pytest.mark.timeout(DEADLINE_S + 180)
def test_a_rank_drained_before_training_hands_the_gang_back(
        redis_url: str, creds: dict[str, str], r: redis.Redis, tmp_path: Path) -> None:
    """docs/distributed.md: a drain of any member hands the job back without spending an attempt. Here the
    member is drained while its job process still downloads the checkpoint (held by its proxy), before the
    gang formed: rank 0 cannot hand the job back, so that rank must; else the rendezvous deadline fails
    the attempt as the drained node's fault."""
    gateway, url = start_gateway(redis_url, {"CYXWIZ_RENDEZVOUS_TIMEOUT_S": str(DEADLINE_S)})
    nodes = ProxiedNodes(url, creds["join_token"], tmp_path)
    failed = True
    try:
        members = {name: nodes.start(name) for name in ("member-a", "member-b")}
        downloads = {name: proxy.hold(lambda seen: seen.method == "GET" and seen.path.endswith(
            "/artifacts/checkpoint.safetensors")) for name, (_, proxy) in members.items()}
        with httpx.Client(base_url=url, timeout=10) as http:
            api = Api(http, creds["api_key"])
            api.wait_nodes(2)
            job_id = api.submit(gang_digits(epochs=50))
            job = wait_until(lambda: (placed := api.job(job_id))["node_ids"] and placed, 60, what="the placement")
            names = {n["node_id"]: n["name"] for n in api.nodes()}
            leader, follower = (names[node_id] for node_id in job["node_ids"])
            downloads[leader].release.set()
            assert downloads[follower].arrived.wait(60)  # rank 1's job process is fetching the checkpoint
            reputation = r.hget(keys.REPUTATION, follower)
            drained = members[follower][0]
            drained.signal(signal.SIGTERM)
            wait_until(lambda: "to stop at their next step" in drained.log(), 60, what="the drain to ask the job")
            downloads[follower].release.set()
            assert drained.wait(60) == 0
            # the attempt ends: handed back at once, or (the bug) failed by the deadline
            job = wait_until(lambda: (now := api.job(job_id))["attempt"] >= 2 and now, DEADLINE_S + 60,
                             what="attempt 1 to end")
            assert "handed back" in job["attempts"][0]["ended"], job["attempts"]
            assert r.hget(keys.job_key(job_id), "lost_count") == "0"  # no attempt spent
            assert r.hget(keys.REPUTATION, follower) == reputation  # the drained node was not charged
        failed = False
    finally:
        nodes.close(print_logs=failed)
        gateway.terminate()
        gateway.wait(10)
