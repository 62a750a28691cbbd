"""Submit function: placement, queueing, backfill, priority, idempotency, tenants, listing, cancel."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import DIGITS_SPEC, GPU_CAPS, KeepAlive, bearer, keyspace, register, submit


def tenant_key(http: httpx.Client, admin_key: str, tenant: str) -> str:
    resp = http.post("/v1/keys", json={"tenant": tenant}, headers=bearer(admin_key))
    assert resp.status_code == 201 and resp.json()["tenant"] == tenant
    return resp.json()["api_key"]  # type: ignore[no-any-return]


def test_submit_assigns_to_best_node_and_streams_it(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    reg = register(http, creds["join_token"])
    answer = submit(http, creds["api_key"])
    assert answer["status"] == "assigned" and answer["node_id"] == reg["node_id"]
    entries = r.xrange(reg["assignments"]["stream"])
    assert len(entries) == 1
    fields = entries[0][1]
    assert fields["job_id"] == answer["job_id"] and fields["attempt"] == "1"
    assert '"digits"' in fields["spec"]
    job = http.get(f"/v1/jobs/{answer['job_id']}", headers=bearer(creds["api_key"])).json()
    assert job["status"] == "assigned" and job["attempt"] == 1 and job["spec"]["training"]["batch_size"] == 64
    assert job["created_at"].endswith("Z") and job["tenant"] == "admin"


def test_submit_without_nodes_queues(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    answer = submit(http, creds["api_key"])
    assert answer == {"job_id": answer["job_id"], "status": "queued", "node_id": None}
    assert r.zscore("cyxwiz:queue:parked", answer["job_id"]) is not None  # no node at all: parked
    job = http.get(f"/v1/jobs/{answer['job_id']}", headers=bearer(creds["api_key"])).json()
    assert job["pending_reason"] == "no_node_fits"


def test_registration_pulls_queued_jobs(http: httpx.Client, creds: dict[str, str]) -> None:
    first, second = submit(http, creds["api_key"]), submit(http, creds["api_key"])
    reg = register(http, creds["join_token"], slots=1)
    jobs = {j: http.get(f"/v1/jobs/{j}", headers=bearer(creds["api_key"])).json()
            for j in (first["job_id"], second["job_id"])}
    assert jobs[first["job_id"]]["status"] == "assigned" and jobs[first["job_id"]]["node_id"] == reg["node_id"]
    assert jobs[second["job_id"]]["status"] == "queued"  # FIFO, one slot


def test_priority_then_fifo_and_backfill(http: httpx.Client, creds: dict[str, str]) -> None:
    key = creds["api_key"]
    big = submit(http, key, requirements={"gpu": True})  # fits no CPU node: must not block others
    low = submit(http, key, priority="low")
    normal1 = submit(http, key)
    high = submit(http, key, priority="high")
    normal2 = submit(http, key)
    register(http, creds["join_token"], slots=3)
    status = {name: http.get(f"/v1/jobs/{j['job_id']}", headers=bearer(key)).json()["status"]
              for name, j in {"big": big, "low": low, "normal1": normal1, "high": high, "normal2": normal2}.items()}
    assert status == {"big": "queued", "low": "queued", "normal1": "assigned", "high": "assigned",
                      "normal2": "assigned"}
    gpu = register(http, creds["join_token"], "gpu", slots=1, capabilities=GPU_CAPS)
    job = http.get(f"/v1/jobs/{big['job_id']}", headers=bearer(key)).json()
    assert job["status"] == "assigned" and job["node_id"] == gpu["node_id"]


@pytest.mark.parametrize(("requirements", "fits"), [
    ({"gpu": True}, "gpu"),
    ({"min_gpu_memory_mb": 100000}, "gpu"),
    ({"min_ram_mb": 100000}, "gpu"),
    ({"labels": {"region": "eu"}}, "cpu"),
    ({"labels": {"region": "us"}}, None),
])
def test_requirements_pick_matching_nodes(http: httpx.Client, creds: dict[str, str],
                                          requirements: dict[str, Any], fits: str | None) -> None:
    nodes = {"cpu": register(http, creds["join_token"], "cpu", labels={"region": "eu"}),
             "gpu": register(http, creds["join_token"], "gpu", capabilities=GPU_CAPS)}
    answer = submit(http, creds["api_key"], requirements=requirements)
    assert answer["node_id"] == (nodes[fits]["node_id"] if fits else None)


def test_cpu_job_prefers_cpu_nodes(http: httpx.Client, creds: dict[str, str]) -> None:
    cpu = register(http, creds["join_token"], "cpu")
    register(http, creds["join_token"], "gpu", capabilities=GPU_CAPS)
    assert submit(http, creds["api_key"])["node_id"] == cpu["node_id"]


async def test_concurrent_submits_never_overfill_nodes(api_url: str, creds: dict[str, str], r: redis.Redis) -> None:
    with httpx.Client(base_url=api_url) as http:
        nodes = [register(http, creds["join_token"], f"n{i}", slots=2) for i in range(10)]
    with KeepAlive(api_url, nodes):
        async with httpx.AsyncClient(base_url=api_url, timeout=30,
                                     limits=httpx.Limits(max_connections=50)) as client:
            answers = await asyncio.gather(*[
                client.post("/v1/jobs", json=DIGITS_SPEC, headers=bearer(creds["api_key"])) for _ in range(200)])
        assert all(a.status_code == 201 for a in answers)
        statuses = [a.json()["status"] for a in answers]
        assert statuses.count("assigned") == 20 and statuses.count("queued") == 180
        for reg in nodes:
            node = r.hgetall(f"cyxwiz:node:{reg['node_id']}")
            assert node["running"] == "2" and r.scard(f"cyxwiz:node:{reg['node_id']}:jobs") == 2
            assert r.xlen(reg["assignments"]["stream"]) == 2
        assert r.zcard("cyxwiz:queue:cpu") == 180


def test_idempotency_key_returns_first_job(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    headers = {**bearer(creds["api_key"]), "Idempotency-Key": "order-42"}
    first = http.post("/v1/jobs", json=DIGITS_SPEC, headers=headers)
    again = http.post("/v1/jobs", json=DIGITS_SPEC, headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["job_id"] == first.json()["job_id"]
    assert r.zcard("cyxwiz:jobs:*:*") == 1
    other = tenant_key(http, creds["api_key"], "acme")
    third = http.post("/v1/jobs", json=DIGITS_SPEC, headers={**bearer(other), "Idempotency-Key": "order-42"})
    assert third.status_code == 201 and third.json()["job_id"] != first.json()["job_id"]


@pytest.mark.parametrize(("body", "status", "field"), [
    (b"not json", 400, None),
    (b'"a string"', 400, None),
    (b'{"dataset": {"name": "digits"}, "training": {"epochs": 1}}', 422, "model"),
    (b'{"model": {"type": "mlp"}, "dataset": {"name": "digits"}, "training": {"epochs": 1}, "colour": 1}', 422,
     "colour"),
    (b'{"model": {"type": "mlp", "hiddn": [4]}, "dataset": {"name": "digits"}, "training": {"epochs": 1}}', 422,
     "model.hiddn"),
    (b'{"model": {"type": "mlp"}, "dataset": {"name": "digits"}, "training": {"epochs": -1}}', 422,
     "training.epochs"),
    (b'{"model": {"type": "mlp"}, "dataset": {"name": "digits"}, "training": {"epochs": 1}, "priority": "urgent"}',
     422, "priority"),
])
def test_invalid_specs_change_nothing(http: httpx.Client, creds: dict[str, str], r: redis.Redis,
                                      body: bytes, status: int, field: str | None) -> None:
    register(http, creds["join_token"])
    before = keyspace(r)
    resp = http.post("/v1/jobs", content=body, headers=bearer(creds["api_key"]))
    assert resp.status_code == status, resp.text
    assert resp.json()["error"].get("field") == field
    assert keyspace(r) == before


def test_submit_needs_api_key(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    reg = register(http, creds["join_token"])
    before = keyspace(r)
    for headers in ({}, bearer("cwk_unknown"), bearer(reg["session_token"]), {"Authorization": "Basic abc"}):
        resp = http.post("/v1/jobs", json=DIGITS_SPEC, headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
    assert keyspace(r) == before


def test_tenants_are_isolated(http: httpx.Client, creds: dict[str, str]) -> None:
    a, b = tenant_key(http, creds["api_key"], "alpha"), tenant_key(http, creds["api_key"], "beta")
    job = submit(http, a)["job_id"]
    assert http.get(f"/v1/jobs/{job}", headers=bearer(b)).status_code == 404
    assert http.post(f"/v1/jobs/{job}/cancel", headers=bearer(b)).status_code == 404
    assert http.get(f"/v1/jobs/{job}/progress", headers=bearer(b)).status_code == 404
    assert http.get(f"/v1/jobs/{job}/artifacts/model.safetensors", headers=bearer(b)).status_code == 404
    assert http.get("/v1/jobs", headers=bearer(b)).json()["jobs"] == []
    assert [j["job_id"] for j in http.get("/v1/jobs", headers=bearer(a)).json()["jobs"]] == [job]
    assert http.get(f"/v1/jobs/{job}", headers=bearer(creds["api_key"])).status_code == 200  # admin sees all


def test_keys_need_admin_and_valid_tenant(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    user = tenant_key(http, creds["api_key"], "alpha")
    before = keyspace(r)
    assert http.post("/v1/keys", json={"tenant": "x"}, headers=bearer(user)).status_code == 403
    for body, field in (({"tenant": "Not Valid!"}, "tenant"), ({}, "tenant"), ({"tenant": "a", "x": 1}, "x")):
        resp = http.post("/v1/keys", json=body, headers=bearer(creds["api_key"]))
        assert resp.status_code == 422 and resp.json()["error"]["field"] == field
    assert keyspace(r) == before


def test_list_jobs_pages_and_filters(http: httpx.Client, creds: dict[str, str]) -> None:
    key = creds["api_key"]
    ids = [submit(http, key)["job_id"] for _ in range(5)]
    http.post(f"/v1/jobs/{ids[0]}/cancel", headers=bearer(key))
    page1 = http.get("/v1/jobs?limit=2", headers=bearer(key)).json()
    page2 = http.get(f"/v1/jobs?limit=2&cursor={page1['next_cursor']}", headers=bearer(key)).json()
    page3 = http.get(f"/v1/jobs?limit=2&cursor={page2['next_cursor']}", headers=bearer(key)).json()
    seen = [j["job_id"] for p in (page1, page2, page3) for j in p["jobs"]]
    assert seen == ids[::-1] and page3["next_cursor"] is None
    cancelled = http.get("/v1/jobs?status=cancelled", headers=bearer(key)).json()["jobs"]
    assert [j["job_id"] for j in cancelled] == [ids[0]]
    assert len(http.get("/v1/jobs?status=queued", headers=bearer(key)).json()["jobs"]) == 4
    for query, field in (("status=nope", "status"), ("limit=0", "limit"), ("limit=x", "limit"),
                         ("cursor=abc", "cursor")):
        resp = http.get(f"/v1/jobs?{query}", headers=bearer(key))
        assert resp.status_code == 422 and resp.json()["error"]["field"] == field


def test_cancel_queued_and_terminal(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    job = submit(http, creds["api_key"])["job_id"]
    resp = http.post(f"/v1/jobs/{job}/cancel", headers=bearer(creds["api_key"]))
    assert resp.status_code == 202 and resp.json()["status"] == "cancelled"
    assert r.zscore("cyxwiz:queue:cpu", job) is None
    before = keyspace(r)
    again = http.post(f"/v1/jobs/{job}/cancel", headers=bearer(creds["api_key"]))
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_terminal"
    assert keyspace(r) == before
    assert http.post("/v1/jobs/j-nope/cancel", headers=bearer(creds["api_key"])).status_code == 404


def test_cancel_assigned_frees_slot_and_tells_node(http: httpx.Client, creds: dict[str, str]) -> None:
    reg = register(http, creds["join_token"], slots=1)
    running = submit(http, creds["api_key"])["job_id"]
    waiting = submit(http, creds["api_key"])["job_id"]
    http.post(f"/v1/jobs/{running}/cancel", headers=bearer(creds["api_key"]))
    # the freed slot went to the waiting job at once
    assert http.get(f"/v1/jobs/{waiting}", headers=bearer(creds["api_key"])).json()["node_id"] == reg["node_id"]
    beat = http.post(f"/v1/nodes/{reg['node_id']}/heartbeat", headers=bearer(reg["session_token"])).json()
    assert beat["cancel"] == [running]
    beat = http.post(f"/v1/nodes/{reg['node_id']}/heartbeat", headers=bearer(reg["session_token"])).json()
    assert beat["cancel"] == []


def test_malformed_ids_and_numbers_are_client_errors(http: httpx.Client, creds: dict[str, str],
                                                     r: redis.Redis) -> None:
    reg = register(http, creds["join_token"])
    job_id = submit(http, creds["api_key"])["job_id"]
    key = bearer(creds["api_key"])
    before = keyspace(r)
    for method, path in (("GET", f"/v1/jobs/{job_id}:progress"), ("POST", f"/v1/jobs/{job_id}:progress/cancel"),
                         ("GET", f"/v1/jobs/{job_id}:artifact:model.safetensors"),
                         ("GET", f"/v1/nodes/{reg['node_id']}:jobs"), ("GET", "/v1/jobs/J-UPPER")):
        resp = http.request(method, path, headers=key)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found", path
    for path, field in (("/v1/jobs?cursor=%C2%B2", "cursor"), ("/v1/nodes?limit=%C2%B2", "limit"),
                        ("/v1/nodes?cursor=%C2%B2", "cursor")):
        resp = http.get(path, headers=key)
        assert resp.status_code == 422 and resp.json()["error"]["field"] == field, path
    assert keyspace(r) == before


def test_admin_tenant_name_is_reserved(http: httpx.Client, creds: dict[str, str]) -> None:
    resp = http.post("/v1/keys", json={"tenant": "admin"}, headers=bearer(creds["api_key"]))
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "tenant"


def test_gpu_jobs_never_hide_cpu_work_from_cpu_nodes(redis_url: str, creds: dict[str, str]) -> None:
    """More GPU-only jobs than a queue scan looks at sit ahead of a CPU job: a CPU node still finds it."""
    from tests.conftest import start_gateway

    proc, url = start_gateway(redis_url, {"CYXWIZ_QUEUE_SCAN": "5"})
    try:
        with httpx.Client(base_url=url) as http:
            node = register(http, creds["join_token"], "cpu-only")
            busy = submit(http, creds["api_key"])["job_id"]
            for _ in range(8):
                assert submit(http, creds["api_key"], requirements={"gpu": True})["status"] == "queued"
            waiting = submit(http, creds["api_key"])["job_id"]
            http.post(f"/v1/jobs/{busy}/cancel", headers=bearer(creds["api_key"]))  # the slot frees
            job = http.get(f"/v1/jobs/{waiting}", headers=bearer(creds["api_key"])).json()
            assert job["status"] == "assigned" and job["node_id"] == node["node_id"]
    finally:
        proc.terminate()
        proc.wait()


def test_tenant_names_are_matched_whole(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    """``$`` matches before a final newline: "admin\\n" must not pass as a tenant name (nor get around the
    reserved "admin")."""
    before = keyspace(r)
    for tenant in ("admin\n", "acme\n", "acme\r\n", "\nacme", "ac\nme", "acme\x1b", "acme\x00"):
        resp = http.post("/v1/keys", json={"tenant": tenant}, headers=bearer(creds["api_key"]))
        assert resp.status_code == 422 and resp.json()["error"]["field"] == "tenant", repr(tenant)
    assert keyspace(r) == before


@pytest.mark.parametrize("query", ["cursor=9223372036854775807", "cursor=" + "9" * 400, "cursor=-5",
                                   "cursor=1.5", "cursor=1e9", "cursor=inf", "limit=-1",
                                   "limit=" + "9" * 30, "limit=501"])
def test_job_page_bounds_are_client_errors(http: httpx.Client, creds: dict[str, str], query: str) -> None:
    submit(http, creds["api_key"])
    resp = http.get(f"/v1/jobs?{query}", headers=bearer(creds["api_key"]))
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == query.split("=")[0]


def test_keys_have_ids_and_admins_list_and_revoke_them(http: httpx.Client, creds: dict[str, str],
                                                       r: redis.Redis) -> None:
    import hashlib

    admin = bearer(creds["api_key"])
    created = http.post("/v1/keys", json={"tenant": "acme"}, headers=admin).json()
    key_id = created["key_id"]
    assert key_id == "k-" + hashlib.sha256(created["api_key"].encode()).hexdigest()[:16]
    assert r.hget("cyxwiz:auth:key_ids", key_id) == hashlib.sha256(created["api_key"].encode()).hexdigest()
    listed = http.get("/v1/keys", headers=admin).json()["keys"]
    assert {(k["tenant"], k["admin"]) for k in listed} == {("admin", True), ("acme", False)}
    assert all(set(k) == {"key_id", "tenant", "admin", "created"} and k["created"].endswith("Z") for k in listed)
    assert created["api_key"] not in str(listed) and creds["api_key"] not in str(listed)
    own_id = next(k["key_id"] for k in listed if k["admin"])
    user = bearer(created["api_key"])
    assert http.get("/v1/keys", headers=user).status_code == 403
    assert http.delete(f"/v1/keys/{own_id}", headers=user).status_code == 403
    before = keyspace(r)
    for unknown in ("k-0123456789abcdef", "nope", "k-0123"):
        resp = http.delete(f"/v1/keys/{unknown}", headers=admin)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    own = http.delete(f"/v1/keys/{own_id}", headers=admin)
    assert own.status_code == 409 and own.json()["error"]["code"] == "own_key"
    assert "making this request" in own.json()["error"]["message"]
    assert keyspace(r) == before
    assert http.get("/v1/jobs", headers=user).status_code == 200
    revoked = http.delete(f"/v1/keys/{key_id}", headers=admin)
    assert revoked.status_code == 200 and revoked.json() == {"key_id": key_id, "tenant": "acme", "revoked": True}
    assert http.get("/v1/jobs", headers=user).status_code == 401
    assert http.delete(f"/v1/keys/{key_id}", headers=admin).status_code == 404
    assert [k["key_id"] for k in http.get("/v1/keys", headers=admin).json()["keys"]] == [own_id]


def test_keys_stored_before_ids_get_one(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    """A key stored without ``key_id`` still works, is listed with the id derived from its digest (which
    is then indexed), and can be revoked by that id, listed first or not."""
    import hashlib
    import json

    admin = bearer(creds["api_key"])
    old_keys = ["cwk_old-key-one", "cwk_old-key-two"]
    for key in old_keys:
        r.hset("cyxwiz:auth:api_keys", hashlib.sha256(key.encode()).hexdigest(),
               json.dumps({"tenant": "legacy", "admin": False, "created": 1700000000}))
    ids = ["k-" + hashlib.sha256(key.encode()).hexdigest()[:16] for key in old_keys]
    assert http.get("/v1/jobs", headers=bearer(old_keys[0])).status_code == 200
    assert http.delete(f"/v1/keys/{ids[1]}", headers=admin).status_code == 200  # never listed
    assert http.get("/v1/jobs", headers=bearer(old_keys[1])).status_code == 401
    listed = {k["key_id"]: k for k in http.get("/v1/keys", headers=admin).json()["keys"]}
    assert listed[ids[0]] == {"key_id": ids[0], "tenant": "legacy", "admin": False,
                              "created": "2023-11-14T22:13:20.000Z"}
    assert ids[1] not in listed
    assert r.hget("cyxwiz:auth:key_ids", ids[0]) == hashlib.sha256(old_keys[0].encode()).hexdigest()
    admin_id = next(key_id for key_id, k in listed.items() if k["admin"])
    assert r.hexists("cyxwiz:auth:key_ids", admin_id)  # the installed admin key has its id too
    assert http.delete(f"/v1/keys/{ids[0]}", headers=admin).status_code == 200
    assert http.get("/v1/jobs", headers=bearer(old_keys[0])).status_code == 401


def test_admin_lists_one_tenants_jobs(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    """``GET /v1/jobs?tenant=T``: an admin sees that tenant's jobs only; a tenant's key may name itself,
    and naming another tenant is 403 (not an empty page, which would hide the mistake)."""
    admin = bearer(creds["api_key"])
    alpha, beta = tenant_key(http, creds["api_key"], "alpha"), tenant_key(http, creds["api_key"], "beta")
    alpha_jobs = [submit(http, alpha)["job_id"] for _ in range(2)]
    beta_job = submit(http, beta)["job_id"]
    http.post(f"/v1/jobs/{alpha_jobs[0]}/cancel", headers=admin)

    def listed(query: str, key: dict[str, str] = admin) -> list[str]:
        resp = http.get(f"/v1/jobs?{query}", headers=key)
        assert resp.status_code == 200, resp.text
        return [job["job_id"] for job in resp.json()["jobs"]]

    assert listed("tenant=alpha") == alpha_jobs[::-1]
    assert listed("tenant=alpha&status=cancelled") == [alpha_jobs[0]]
    assert listed("tenant=beta") == [beta_job]
    assert listed("tenant=nobody") == []
    assert set(listed("")) == {*alpha_jobs, beta_job}
    assert listed("tenant=alpha", bearer(alpha)) == alpha_jobs[::-1]
    other = http.get("/v1/jobs?tenant=beta", headers=bearer(alpha))
    assert other.status_code == 403 and other.json()["error"]["code"] == "forbidden"
    bad = http.get("/v1/jobs?tenant=Not%20Valid", headers=admin)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "tenant"
