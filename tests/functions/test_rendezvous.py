"""The rendezvous of a multi-node job over HTTP (docs/distributed.md): only the gang's members, each with
its own rank, of the current attempt; rank 0 alone publishes its store, once, at its registered address, before
it may say it is ready; bad input gets the contract's error and changes nothing; a node's stated address is
checked."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import redis

from tests.conftest import CPU_CAPS, DIGITS_SPEC, bearer, keyspace, register, submit

GANG_SPEC = {**DIGITS_SPEC, "requirements": {"nodes": 2}}


def join(http: httpx.Client, join_token: str, name: str, address: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "slots": 1, "capabilities": CPU_CAPS, "labels": {}}
    if address is not None:
        body["address"] = address
    resp = http.post("/v1/nodes", json=body, headers=bearer(join_token))
    assert resp.status_code == 201, resp.text
    return resp.json()  # type: ignore[no-any-return]


def rendezvous(http: httpx.Client, token: str, job_id: str, **body: object) -> httpx.Response:
    return http.post(f"/v1/jobs/{job_id}/rendezvous", json=body, headers=bearer(token))


def placed_gang(http: httpx.Client, creds: dict[str, str]) -> tuple[str, dict[str, dict[str, Any]]]:
    """A 2-node job placed on nodes registered at 10.9.0.1 and 10.9.0.2: (job id, {rank: registration})."""
    nodes = [join(http, creds["join_token"], f"rank-{i}", f"10.9.0.{i + 1}") for i in range(2)]
    job_id = submit(http, creds["api_key"], GANG_SPEC)["job_id"]
    job = http.get(f"/v1/jobs/{job_id}", headers=bearer(creds["api_key"])).json()
    assert job["status"] == "assigned" and len(job["node_ids"]) == 2, job
    by_id = {n["node_id"]: n for n in nodes}
    return job_id, {rank: by_id[node_id] for rank, node_id in enumerate(job["node_ids"])}


def test_ranks_meet_at_rank_0s_registered_address(http: httpx.Client, creds: dict[str, str]) -> None:
    job_id, ranks = placed_gang(http, creds)
    follower = http.get(f"/v1/jobs/{job_id}/rendezvous", params={"attempt": 1, "rank": 1},
                        headers=bearer(ranks[1]["session_token"]))
    assert follower.status_code == 200 and follower.json()["master"] is None
    published = rendezvous(http, ranks[0]["session_token"], job_id, attempt=1, rank=0, port=29500).json()
    host = ranks[0]["address"]
    assert published["master"] == f"{host}:29500" and published["arrived"] == [0] and published["world_size"] == 2
    assert rendezvous(http, ranks[1]["session_token"], job_id, attempt=1, rank=1).json()["arrived"] == [0, 1]
    for rank in (0, 1):
        state = rendezvous(http, ranks[rank]["session_token"], job_id, attempt=1, rank=rank, ready=True).json()
    assert state["ready"] == [0, 1] and state["node_ids"] == [ranks[0]["node_id"], ranks[1]["node_id"]]


def test_only_members_with_their_own_rank_may_use_it_and_refusals_change_nothing(
        http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    job_id, ranks = placed_gang(http, creds)
    outsider = register(http, creds["join_token"], "outsider")
    rendezvous(http, ranks[0]["session_token"], job_id, attempt=1, rank=0, port=29500)
    before = keyspace(r)
    url = f"/v1/jobs/{job_id}/rendezvous"
    refusals = [
        (rendezvous(http, outsider["session_token"], job_id, attempt=1, rank=1), 403, "forbidden"),
        (rendezvous(http, ranks[1]["session_token"], job_id, attempt=1, rank=0, port=1), 403, "forbidden"),
        (rendezvous(http, ranks[1]["session_token"], job_id, attempt=1, rank=1, port=2222), 422, "invalid_field"),
        (rendezvous(http, ranks[1]["session_token"], job_id, attempt=2, rank=1), 403, "forbidden"),  # not yet
        (rendezvous(http, creds["api_key"], job_id, attempt=1, rank=1), 401, "unauthorized"),
        (http.post(url, json={"attempt": 1, "rank": 1}), 401, "unauthorized"),
        (http.get(url, params={"attempt": 1, "rank": 1}, headers=bearer(outsider["session_token"])), 403,
         "forbidden"),
        (http.get(url, params={"attempt": "one", "rank": 1}, headers=bearer(ranks[1]["session_token"])), 422,
         "invalid_field"),
        (rendezvous(http, ranks[1]["session_token"], "j-nope", attempt=1, rank=1), 404, "not_found"),
    ]
    for bad in ({"attempt": 1, "rank": 0, "port": 0}, {"attempt": 1, "rank": 0, "port": 65536},
                {"attempt": 1, "rank": 0, "port": "29500"}, {"attempt": 1, "rank": 0, "port": True},
                {"attempt": 1, "rank": -1}, {"attempt": "1", "rank": 0}, {"attempt": 1, "rank": 0, "ready": "yes"},
                {"attempt": 1, "rank": 0, "host": "evil.example"}, {"rank": 0}):
        refusals.append((rendezvous(http, ranks[0]["session_token"], job_id, **bad), 422, "invalid_field"))
    not_json = http.post(url, content=b"[1, 2", headers=bearer(ranks[0]["session_token"]) |
                         {"Content-Type": "application/json"})
    refusals.append((not_json, 400, None))
    for resp, status, code in refusals:
        assert resp.status_code == status, (resp.request.url, resp.request.content, resp.text)
        assert "error" in resp.json() and (code is None or resp.json()["error"]["code"] == code), resp.text
    assert keyspace(r) == before
    # the master is still rank 0's registered address; nobody could move it elsewhere
    state = http.get(url, params={"attempt": 1, "rank": 1}, headers=bearer(ranks[1]["session_token"])).json()
    assert state["master"] == f"{ranks[0]['address']}:29500"


def test_a_failed_attempts_rendezvous_is_fenced(http: httpx.Client, creds: dict[str, str]) -> None:
    job_id, ranks = placed_gang(http, creds)
    rendezvous(http, ranks[0]["session_token"], job_id, attempt=1, rank=0, port=29500)
    failed = http.post(f"/v1/jobs/{job_id}/progress", headers=bearer(ranks[1]["session_token"]),
                       json={"attempt": 1, "seq": 1, "status": "failed", "error": "lost GPU", "fault": "node"})
    assert failed.status_code == 200, failed.text
    job = http.get(f"/v1/jobs/{job_id}", headers=bearer(creds["api_key"])).json()
    assert job["attempt"] == 2 and job["attempts"][0]["ended"]
    stale = rendezvous(http, ranks[0]["session_token"], job_id, attempt=1, rank=0, port=29501)
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "stale_attempt", stale.text


def test_a_one_node_job_has_no_rendezvous(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    node = register(http, creds["join_token"], "single")
    job_id = submit(http, creds["api_key"])["job_id"]
    before = keyspace(r)
    resp = rendezvous(http, node["session_token"], job_id, attempt=1, rank=0, port=29500)
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid_field"
    assert keyspace(r) == before


def test_rank_0_is_ready_only_once_it_published_its_store(http: httpx.Client, creds: dict[str, str],
                                                          r: redis.Redis) -> None:
    job_id, ranks = placed_gang(http, creds)
    assert rendezvous(http, ranks[0]["session_token"], job_id, attempt=1, rank=0).status_code == 200  # arrived
    before = keyspace(r)
    early = rendezvous(http, ranks[0]["session_token"], job_id, attempt=1, rank=0, ready=True)
    assert early.status_code == 409 and early.json()["error"]["code"] == "conflict", early.text
    assert keyspace(r) == before
    published = rendezvous(http, ranks[0]["session_token"], job_id, attempt=1, rank=0, port=29500)
    again = rendezvous(http, ranks[0]["session_token"], job_id, attempt=1, rank=0, port=29500)  # a retry
    assert again.status_code == 200 and again.json()["master"] == published.json()["master"]
    moved = rendezvous(http, ranks[0]["session_token"], job_id, attempt=1, rank=0, port=29501)
    assert moved.status_code == 409 and moved.json()["error"]["code"] == "conflict", moved.text
    assert rendezvous(http, ranks[0]["session_token"], job_id, attempt=1, rank=0, ready=True).json()["ready"] == [0]


# where a hostile node would send its gang's other ranks: metadata services, link-local, unspecified, multicast
# and broadcast addresses (numeric host names are IPv4 addresses to a resolver: 2852039166 is 169.254.169.254)
UNSAFE_ADDRESSES = ["169.254.169.254", "fe80::1", "metadata.google.internal", "Metadata.Google.Internal.",
                    "metadata", "instance-data", "0.0.0.0", "::", "224.0.0.251", "ff02::1", "255.255.255.255",
                    "::ffff:169.254.169.254", "2852039166", "0xa9fea9fe", "169.254.43518", "10.0.0.1.2"]


@pytest.mark.parametrize("address", ["", "not an address", "a" * 300, "http://10.0.0.1", "10.0.0.1:22", 7,
                                     *UNSAFE_ADDRESSES])
def test_a_node_states_a_reachable_address_or_is_refused(http: httpx.Client, creds: dict[str, str],
                                                          r: redis.Redis, address: object) -> None:
    before = keyspace(r)
    resp = http.post("/v1/nodes", json={"name": "addr", "slots": 1, "capabilities": CPU_CAPS, "address": address},
                     headers=bearer(creds["join_token"]))
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid_field", resp.text
    assert resp.json()["error"].get("field") == "address"
    assert keyspace(r) == before


@pytest.mark.parametrize("address", ["10.1.2.3", "192.168.7.7", "127.0.0.1", "fd12::3", "node-7.example",
                                     "gpu01.cluster.internal.", "localhost"])
def test_ordinary_addresses_are_accepted(http: httpx.Client, creds: dict[str, str], address: str) -> None:
    assert join(http, creds["join_token"], "ordinary", address)["address"] == address


def test_the_address_defaults_to_what_the_gateway_saw(http: httpx.Client, creds: dict[str, str]) -> None:
    stated = join(http, creds["join_token"], "stated", "gpu-7.cluster.internal")
    seen = join(http, creds["join_token"], "seen")
    assert stated["address"] == "gpu-7.cluster.internal"
    assert seen["address"] == "127.0.0.1"
    nodes = {n["name"]: n for n in http.get("/v1/nodes", headers=bearer(creds["api_key"])).json()["nodes"]}
    assert nodes["stated"]["address"] == "gpu-7.cluster.internal" and nodes["seen"]["address"] == "127.0.0.1"
