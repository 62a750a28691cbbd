"""Heartbeat function: liveness, cancels, pulling queued work, and lazy reaping of lapsed nodes."""

from __future__ import annotations

import time

import httpx
import redis

from tests.conftest import bearer, keyspace, register, submit


def beat(http: httpx.Client, reg: dict[str, str], **body: object) -> httpx.Response:
    return http.post(f"/v1/nodes/{reg['node_id']}/heartbeat", json=body or None, headers=bearer(reg["session_token"]))


def test_heartbeat_refreshes_ttl(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    reg = register(http, creds["join_token"])
    time.sleep(1.0)
    resp = beat(http, reg)
    assert resp.status_code == 200
    assert resp.json() == {"ttl_s": 2.0, "cancel": [], "stop": [], "status": "online", "assigned": 0}
    now_ms = float(r.time()[0]) * 1000
    assert r.zscore("cyxwiz:nodes:deadline", reg["node_id"]) > now_ms + 1500
    # liveness is the deadline, not a Redis TTL: an outage of the control plane deletes no node
    assert r.pttl(f"cyxwiz:node:{reg['node_id']}") == -1


def test_a_node_that_cannot_read_its_stream_is_unhealthy_and_not_scheduled(
        http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    reg = register(http, creds["join_token"])
    user = f"node-{reg['node_id']}"
    r.acl_deluser(user)  # as a store restarted without its node users would have lost it
    answer = beat(http, reg, stream_error="AuthenticationError: invalid username-password pair").json()
    assert answer["store_url"] == "redis://127.0.0.1:" + reg["assignments"]["redis_url"].rsplit(":", 1)[1]
    assert "@" not in answer["store_url"]  # an address: the node keeps its own credentials
    assert user in r.acl_users()  # recreated from the digest on the node hash
    node = http.get(f"/v1/nodes/{reg['node_id']}", headers=bearer(creds["api_key"])).json()
    assert node["status"] == "unhealthy" and "invalid username" in node["health"]
    job = submit(http, creds["api_key"])
    assert job["status"] == "queued"  # not placed on a node that cannot read its assignments
    healthy = beat(http, reg).json()
    assert healthy["assigned"] == 1 and "store_url" not in healthy
    node = http.get(f"/v1/nodes/{reg['node_id']}", headers=bearer(creds["api_key"])).json()
    assert node["status"] == "online" and node["health"] is None


def test_heartbeat_auth(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    a, b = register(http, creds["join_token"], "a"), register(http, creds["join_token"], "b")
    before = keyspace(r)
    other = http.post(f"/v1/nodes/{a['node_id']}/heartbeat", headers=bearer(b["session_token"]))
    assert other.status_code == 403 and other.json()["error"]["code"] == "forbidden"
    for headers in ({}, bearer("cwn.x.y"), bearer(creds["api_key"])):
        assert http.post(f"/v1/nodes/{a['node_id']}/heartbeat", headers=headers).status_code == 401
    bad = http.post(f"/v1/nodes/{a['node_id']}/heartbeat", json={"gpu_free_mb": "lots"},
                    headers=bearer(a["session_token"]))
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "gpu_free_mb"
    assert keyspace(r) == before


def test_heartbeat_pulls_queued_work(http: httpx.Client, creds: dict[str, str]) -> None:
    reg = register(http, creds["join_token"], slots=1)
    first, second = submit(http, creds["api_key"]), submit(http, creds["api_key"])
    assert second["status"] == "queued"
    http.post(f"/v1/jobs/{first['job_id']}/cancel", headers=bearer(creds["api_key"]))
    # cancelling freed the slot and pulled the queue already; the heartbeat reports the cancel
    assert beat(http, reg).json()["cancel"] == [first["job_id"]]
    assert http.get(f"/v1/jobs/{second['job_id']}", headers=bearer(creds["api_key"])).json()["status"] == "assigned"


def test_cancel_lists_job_ids_and_stop_lists_gang_attempts_ended_elsewhere(http: httpx.Client,
                                                                            creds: dict[str, str]) -> None:
    from tests.functions.test_rendezvous import placed_gang

    job_id, ranks = placed_gang(http, creds)
    failed = http.post(f"/v1/jobs/{job_id}/progress", headers=bearer(ranks[1]["session_token"]),
                       json={"attempt": 1, "seq": 1, "status": "failed", "error": "lost GPU", "fault": "node"})
    assert failed.status_code == 200, failed.text
    answer = beat(http, ranks[0]).json()  # rank 0 stops attempt 1 only: the job itself goes on
    assert answer["cancel"] == [] and answer["stop"] == [{"job_id": job_id, "attempt": 1}]
    assert beat(http, ranks[0]).json()["stop"] == []  # said once
    job = http.get(f"/v1/jobs/{job_id}", headers=bearer(creds["api_key"])).json()
    assert job["attempt"] == 2 and job["status"] == "assigned"  # placed again on the same two nodes
    http.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(creds["api_key"]))
    by_id = {reg["node_id"]: reg for reg in ranks.values()}
    first, second = (beat(http, by_id[node_id]).json() for node_id in job["node_ids"])
    assert (first["cancel"], first["stop"]) == ([job_id], [])  # the job's node (rank 0) hears of the cancel
    assert (second["cancel"], second["stop"]) == ([], [{"job_id": job_id, "attempt": 2}])  # the other, its attempt


def test_lapsed_node_is_reaped_and_its_job_moves(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    dead = register(http, creds["join_token"], "dead")
    job = submit(http, creds["api_key"])
    assert job["node_id"] == dead["node_id"]
    alive = register(http, creds["join_token"], "alive")
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:  # the live node heartbeats; its calls reap the dead one
        beat(http, alive)
        state = http.get(f"/v1/jobs/{job['job_id']}", headers=bearer(creds["api_key"])).json()
        if state["node_id"] == alive["node_id"]:
            break
        time.sleep(0.2)
    assert state["node_id"] == alive["node_id"] and state["attempt"] == 2 and state["status"] == "assigned"
    assert not r.exists(f"cyxwiz:node:{dead['node_id']}", f"cyxwiz:node:{dead['node_id']}:jobs",
                        dead["assignments"]["stream"])
    assert r.zscore("cyxwiz:nodes:score", dead["node_id"]) is None
    assert float(r.hget("cyxwiz:reputation", "dead")) < 0.75  # a lost job costs reputation
    lapsed = beat(http, dead)
    assert lapsed.status_code == 401  # its session ended with it: register again


def test_assignment_not_started_in_time_goes_back(redis_url: str, creds: dict[str, str], r: redis.Redis) -> None:
    """A node that heartbeats but never starts its job (it cannot read its stream) does not keep it."""
    from tests.conftest import start_gateway

    proc, url = start_gateway(redis_url, {"CYXWIZ_ASSIGN_TIMEOUT_S": "1"})
    try:
        with httpx.Client(base_url=url) as http:
            stuck_name = "stuck"
            stuck = register(http, creds["join_token"], stuck_name)
            job_id = submit(http, creds["api_key"])["job_id"]
            assert beat(http, stuck).status_code == 200
            healthy = register(http, creds["join_token"], "healthy")
            time.sleep(1.3)
            beat(http, stuck)
            job = http.get(f"/v1/jobs/{job_id}", headers=bearer(creds["api_key"])).json()
            assert job["status"] == "assigned" and job["node_id"] == healthy["node_id"]
            assert job["attempt"] == 2 and r.hget(f"cyxwiz:job:{job_id}", "lost_count") == "1"  # counts
            assert float(r.hget("cyxwiz:reputation", stuck_name)) < 0.75
    finally:
        proc.terminate()
        proc.wait()


def test_a_job_that_keeps_bouncing_ends_failed_with_the_reason(redis_url: str, creds: dict[str, str]) -> None:
    """Nodes that never start what they are given cannot bounce a job forever, silently."""
    from tests.conftest import DIGITS_SPEC, start_gateway

    proc, url = start_gateway(redis_url, {"CYXWIZ_ASSIGN_TIMEOUT_S": "1"})
    try:
        with httpx.Client(base_url=url) as http:
            stuck = register(http, creds["join_token"])
            job_id = submit(http, creds["api_key"], {**DIGITS_SPEC, "max_attempts": 2})["job_id"]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # heartbeats keep it alive; it never starts the job
                beat(http, stuck)
                job = http.get(f"/v1/jobs/{job_id}", headers=bearer(creds["api_key"])).json()
                if job["status"] == "failed":
                    break
                time.sleep(0.2)
            assert job["status"] == "failed" and job["attempt"] == 3
            assert "max_attempts reached" in job["error"] and "did not start it within 1 s" in job["error"]
    finally:
        proc.terminate()
        proc.wait()
