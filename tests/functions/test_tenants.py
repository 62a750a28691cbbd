"""Tenants are strangers: jobs must fit before they are accepted, one tenant cannot starve another,
quotas and retention hold, and every refusal changes nothing. All through the real gateway."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from cyxwiz.embedded import EmbeddedValkey
from cyxwiz.server import install_credentials_at
from shared import auth, keys
from tests.conftest import DIGITS_SPEC, bearer, keyspace, model_weights, register, start_gateway, submit

BOMBS = [  # each got 201 before; each would knock a node out
    ({"name": "blob-bomb", "model": {"type": "mlp"}, "training": {"epochs": 1},
      "dataset": {"name": "blobs", "n_samples": 1_000_000, "n_features": 4096}}, "dataset.n_samples"),
    ({"name": "activation-bomb", "model": {"type": "mlp", "hidden": [65536]}, "dataset": "digits",
      "training": {"epochs": 1, "batch_size": 65536}}, "training.batch_size"),
    ({"name": "attention-bomb", "dataset": "tiny-text", "training": {"epochs": 1, "batch_size": 512},
      "model": {"type": "transformer", "d_model": 1024, "n_heads": 128, "context": 8192}}, "model.context"),
]


def tenant_key(http: httpx.Client, admin_key: str, tenant: str) -> str:
    resp = http.post("/v1/keys", json={"tenant": tenant}, headers=bearer(admin_key))
    assert resp.status_code == 201, resp.text
    return str(resp.json()["api_key"])


def job(http: httpx.Client, key: str, job_id: str) -> dict[str, Any]:
    resp = http.get(f"/v1/jobs/{job_id}", headers=bearer(key))
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def heartbeat(http: httpx.Client, reg: dict[str, Any], body: dict[str, Any] | None = None) -> dict[str, Any]:
    resp = http.post(f"/v1/nodes/{reg['node_id']}/heartbeat", json=body or {}, headers=bearer(reg["session_token"]))
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize(("spec", "field"), BOMBS, ids=[b[0]["name"] for b in BOMBS])
def test_a_job_no_node_could_hold_is_refused_naming_its_field(http: httpx.Client, creds: dict[str, str],
                                                              r: redis.Redis, spec: dict[str, Any],
                                                              field: str) -> None:
    register(http, creds["join_token"])
    before = keyspace(r)
    resp = http.post("/v1/jobs", json=spec, headers=bearer(creds["api_key"]))
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_field" and error["field"] == field
    assert "MiB" in error["message"] and "65,536" in error["message"]
    assert keyspace(r) == before


def test_the_estimate_is_on_the_job_and_placement_respects_free_memory(http: httpx.Client, creds: dict[str, str],
                                                                        r: redis.Redis) -> None:
    key = creds["api_key"]
    small = register(http, creds["join_token"], slots=4, capabilities={"device": "cpu", "cpu_cores": 4,
                                                                      "ram_mb": 6000})
    url_job = {**DIGITS_SPEC, "dataset": {"url": "https://data.example/points.csv"}}  # counts 2 GiB of data
    first = submit(http, key, url_job)
    assert first["status"] == "assigned" and first["node_id"] == small["node_id"]
    estimate = job(http, key, first["job_id"])["resources"]["estimated_memory_mb"]
    assert 2048 < estimate < 3200  # 2 GiB of data, its margin, and torch itself
    second = submit(http, key, url_job)  # fits the node, but not beside the first: it waits
    assert second["status"] == "queued"
    assert job(http, key, second["job_id"])["pending_reason"] == "waiting_for_capacity"
    digits = submit(http, key)  # small jobs still fit beside it
    assert digits["status"] == "assigned"
    assert job(http, key, digits["job_id"])["resources"]["estimated_memory_mb"] < 600
    big = {**DIGITS_SPEC, "dataset": {"name": "blobs", "n_samples": 100_000, "n_features": 4096}}
    parked = submit(http, key, big)  # about 7.6 GiB: no live node could hold it
    assert job(http, key, parked["job_id"])["pending_reason"] == "no_node_fits"
    large = register(http, creds["join_token"], slots=2,
                     capabilities={"device": "cpu", "cpu_cores": 8, "ram_mb": 16000})
    # back for the node that fits (which also takes the older job that waited for memory)
    assert job(http, key, parked["job_id"])["node_id"] == large["node_id"]
    assert job(http, key, second["job_id"])["node_id"] == large["node_id"]


def test_unplaceable_jobs_of_one_tenant_do_not_starve_another(valkey: EmbeddedValkey, creds: dict[str, str],
                                                               r: redis.Redis) -> None:
    # a gateway whose nodes live 10 minutes: 211 submissions on a busy machine can outlast the session's 2 s TTL
    proc, url = start_gateway(valkey.gateway_url, {"CYXWIZ_TTL_S": "600"})
    try:
        with httpx.Client(base_url=url, timeout=10) as http:
            admin = creds["api_key"]
            hog, victim = tenant_key(http, admin, "hog"), tenant_key(http, admin, "victim")
            reg = register(http, creds["join_token"], labels={"zone": "a"})
            blocker = submit(http, hog, DIGITS_SPEC)["job_id"]  # holds the node's one slot
            unplaceable = {**DIGITS_SPEC, "priority": "high", "requirements": {"labels": {"zone": "nowhere"}}}
            for _ in range(210):  # more than a node's queue scan looked at before
                submit(http, hog, unplaceable)
            waiting = submit(http, victim, DIGITS_SPEC)["job_id"]
            assert job(http, victim, waiting)["pending_reason"] == "waiting_for_capacity"
            assert r.zcard(keys.QUEUE_PARKED) == 210
            # the node's slot frees up; its next heartbeat places the fitting job, not one of the 210
            r.hset(keys.job_key(blocker), mapping={"artifacts": '["model.safetensors"]',
                                                   "final:1": '{"weights": "w"}'})
            resp = http.post(f"/v1/jobs/{blocker}/progress", headers=bearer(reg["session_token"]),
                             json={"attempt": 1, "seq": 1, "status": "completed",
                                   "artifacts": ["model.safetensors"]})
            assert resp.status_code == 200, resp.text
            heartbeat(http, reg)
            assert job(http, victim, waiting)["status"] == "assigned"
            listed = http.get("/v1/jobs?status=queued&limit=3", headers=bearer(hog)).json()["jobs"]
            assert [j["pending_reason"] for j in listed] == ["no_node_fits"] * 3
    finally:
        proc.terminate()
        proc.wait(10)


def test_capacity_is_shared_between_tenants(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    admin = creds["api_key"]
    first, second = tenant_key(http, admin, "first"), tenant_key(http, admin, "second")
    reg = register(http, creds["join_token"], slots=2)
    running = [submit(http, first)["job_id"] for _ in range(2)]  # tenant "first" fills both slots ...
    queued_first = [submit(http, first)["job_id"] for _ in range(5)]  # ... and queues five more, earlier
    queued_second = submit(http, second)["job_id"]
    http.post(f"/v1/jobs/{running[0]}/cancel", headers=bearer(first))  # a slot frees
    heartbeat(http, reg)
    # round-robin within a band: "second" holds no slot, so its job goes before five older ones
    assert job(http, second, queued_second)["status"] == "assigned"
    assert all(job(http, first, j)["status"] == "queued" for j in queued_first)


def test_reasons_a_job_waits(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    admin = creds["api_key"]
    limited, other = tenant_key(http, admin, "limited"), tenant_key(http, admin, "other")
    resp = http.put("/v1/tenants/limited", json={"max_running_jobs": 1}, headers=bearer(admin))
    assert resp.status_code == 200 and resp.json()["max_running_jobs"] == 1, resp.text
    reg = register(http, creds["join_token"], slots=3)
    assert submit(http, limited)["status"] == "assigned"
    held = submit(http, limited)["job_id"]  # a free slot, but the tenant is at its running limit
    assert job(http, limited, held)["pending_reason"] == "tenant_limit"
    submit(http, other)
    submit(http, other)  # the node is full now
    high = submit(http, other, priority="high")["job_id"]
    normal = submit(http, other)["job_id"]
    assert job(http, other, high)["pending_reason"] == "waiting_for_capacity"
    assert job(http, other, normal)["pending_reason"] == "priority"
    assert job(http, limited, held)["pending_reason"] == "tenant_limit"
    http.put("/v1/tenants/limited", json={"max_running_jobs": None}, headers=bearer(admin))  # back to default
    assert http.get("/v1/tenants/limited", headers=bearer(admin)).json()["max_running_jobs"] == 64
    assert heartbeat(http, reg)["assigned"] == 0  # still full: nothing changes for "limited" until a slot frees


def test_each_node_of_a_gang_counts_toward_the_running_limit(http: httpx.Client, creds: dict[str, str],
                                                             r: redis.Redis) -> None:
    admin = creds["api_key"]
    limited = tenant_key(http, admin, "limited")
    assert http.put("/v1/tenants/limited", json={"max_running_jobs": 2}, headers=bearer(admin)).status_code == 200
    for _ in range(3):
        register(http, creds["join_token"])
    gang = {**DIGITS_SPEC, "requirements": {"nodes": 2}}
    before = keyspace(r)
    too_big = http.post("/v1/jobs", json={**DIGITS_SPEC, "requirements": {"nodes": 4}}, headers=bearer(limited))
    assert too_big.status_code == 422, too_big.text  # four nodes at once: it could never run
    assert too_big.json()["error"]["field"] == "requirements.nodes" and keyspace(r) == before
    single = submit(http, limited)
    waiting = submit(http, limited, gang)  # two free nodes, but two slots more would make three
    assert waiting["status"] == "queued" and job(http, limited, waiting["job_id"])["pending_reason"] == "tenant_limit"
    http.post(f"/v1/jobs/{single['job_id']}/cancel", headers=bearer(limited))
    assert job(http, limited, waiting["job_id"])["status"] == "assigned"
    assert submit(http, limited)["status"] == "queued"  # the gang holds both slots


def test_a_tenant_over_its_queued_limit_gets_429_and_nothing_changes(http: httpx.Client, creds: dict[str, str],
                                                                      r: redis.Redis) -> None:
    admin = creds["api_key"]
    key = tenant_key(http, admin, "small")
    assert http.put("/v1/tenants/small", json={"max_queued_jobs": 2}, headers=bearer(admin)).status_code == 200
    for _ in range(2):
        submit(http, key)  # no node: both stay queued
    before = keyspace(r)
    resp = http.post("/v1/jobs", json=DIGITS_SPEC, headers=bearer(key))
    assert resp.status_code == 429, resp.text
    error = resp.json()["error"]
    assert error["code"] == "quota_exceeded" and "max_queued_jobs" in error["message"]
    assert keyspace(r) == before
    usage = http.get("/v1/tenants/small", headers=bearer(admin)).json()
    assert usage["queued_jobs"] == 2 and usage["custom_limits"] == ["max_queued_jobs"]


def test_tenant_limits_are_for_admins_and_checked(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    admin = creds["api_key"]
    key = tenant_key(http, admin, "acme")
    assert http.get("/v1/tenants/acme", headers=bearer(key)).status_code == 403
    assert http.put("/v1/tenants/acme", json={"max_queued_jobs": 10**9}, headers=bearer(key)).status_code == 403
    assert http.get("/v1/tenants/nobody", headers=bearer(admin)).status_code == 404
    before = keyspace(r)
    for body, field in (({"max_queued_jobs": -1}, "max_queued_jobs"), ({"max_running_jobs": "5"}, "max_running_jobs"),
                        ({"max_jobs": 5}, "max_jobs")):
        resp = http.put("/v1/tenants/acme", json=body, headers=bearer(admin))
        assert resp.status_code == 422 and resp.json()["error"]["field"] == field, resp.text
    assert keyspace(r) == before


def test_a_hand_back_is_counted_and_goes_to_another_node(http: httpx.Client, creds: dict[str, str],
                                                          r: redis.Redis) -> None:
    key = creds["api_key"]
    first = register(http, creds["join_token"])
    job_id = submit(http, key)["job_id"]
    busy = submit(http, key)["job_id"]  # a second job waits for a slot
    second = register(http, creds["join_token"])
    assert job(http, key, busy)["node_id"] == second["node_id"]
    resp = http.post(f"/v1/jobs/{job_id}/progress", headers=bearer(first["session_token"]),
                     json={"attempt": 1, "seq": 1, "status": "queued"})
    assert resp.status_code == 200, resp.text
    heartbeat(http, first)
    handed = job(http, key, job_id)
    # not straight back onto the node that handed it back, while another node could hold it
    assert handed["status"] == "queued" and handed["handbacks"] == 1
    http.post(f"/v1/jobs/{busy}/cancel", headers=bearer(key))
    assert job(http, key, job_id)["node_id"] == second["node_id"]


def test_finished_jobs_expire_after_the_retention_period(valkey: EmbeddedValkey, creds: dict[str, str],
                                                         r: redis.Redis) -> None:
    proc, url = start_gateway(valkey.gateway_url, {"CYXWIZ_RETENTION_DAYS": "0.00003"})  # about 2.6 s
    try:
        with httpx.Client(base_url=url, timeout=10) as http:
            key = creds["api_key"]
            reg = register(http, creds["join_token"])
            done = submit(http, key)["job_id"]
            resp = http.put(f"/v1/jobs/{done}/artifacts/model.safetensors", content=model_weights(),
                            headers=bearer(reg["session_token"]))
            assert resp.status_code == 201, resp.text
            http.post(f"/v1/jobs/{done}/progress", headers=bearer(reg["session_token"]),
                      json={"attempt": 1, "seq": 1, "status": "completed", "artifacts": ["model.safetensors"]})
            waiting = submit(http, key)["job_id"]  # not finished: kept
            deadline = time.monotonic() + 60
            while http.get(f"/v1/jobs/{done}", headers=bearer(key)).status_code != 404:
                assert time.monotonic() < deadline, "the finished job was never purged"
                time.sleep(0.2)
            assert not r.keys(f"cyxwiz:job:{done}*")
            assert http.get(f"/v1/jobs/{waiting}", headers=bearer(key)).status_code == 200
            assert [j["job_id"] for j in http.get("/v1/jobs", headers=bearer(key)).json()["jobs"]] == [waiting]
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_job_past_its_wall_clock_limit_fails(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    key = creds["api_key"]
    reg = register(http, creds["join_token"])
    spec = {**DIGITS_SPEC, "training": {**DIGITS_SPEC["training"], "max_duration_s": 1}}
    job_id = submit(http, key, spec)["job_id"]
    resp = http.post(f"/v1/jobs/{job_id}/progress", headers=bearer(reg["session_token"]),
                     json={"attempt": 1, "seq": 1, "status": "running"})
    assert resp.status_code == 200
    deadline = time.monotonic() + 30
    while (found := job(http, key, job_id))["status"] != "failed":
        assert time.monotonic() < deadline
        heartbeat(http, reg)
        time.sleep(0.2)
    assert "max_duration_s = 1 s" in found["error"]
    too_long = {**DIGITS_SPEC, "training": {**DIGITS_SPEC["training"], "max_duration_s": 10**9}}
    resp = http.post("/v1/jobs", json=too_long, headers=bearer(key))
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "training.max_duration_s"


def test_parallel_uploads_cannot_overshoot_the_job_cap(valkey: EmbeddedValkey, creds: dict[str, str],
                                                      r: redis.Redis) -> None:
    proc, url = start_gateway(valkey.gateway_url, {"CYXWIZ_MAX_JOB_ARTIFACT_BYTES": str(1 << 20)})
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            reg = register(http, creds["join_token"])
            job_id = submit(http, creds["api_key"])["job_id"]
            headers = bearer(reg["session_token"])
            started, release = threading.Event(), threading.Event()

            def slow_body() -> Iterator[bytes]:
                yield b"x" * 1000
                started.set()
                release.wait(20)
                yield b"x" * (700_000 - 1000)

            results: dict[str, int] = {}

            def first_upload() -> None:
                with httpx.Client(base_url=url, timeout=30) as other:
                    results["first"] = other.put(f"/v1/jobs/{job_id}/artifacts/a.bin", content=slow_body(),
                                                 headers={**headers, "Content-Length": "700000"}).status_code

            thread = threading.Thread(target=first_upload)
            thread.start()
            assert started.wait(20)
            deadline = time.monotonic() + 20  # the gateway has read the headers and reserved the upload
            while not r.hexists(keys.job_uploads_key(job_id), "a.bin"):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            # 700 KB reserved in flight: another 700 KB would overshoot 1 MiB
            second = http.put(f"/v1/jobs/{job_id}/artifacts/b.bin", content=b"y" * 700_000, headers=headers)
            assert second.status_code == 413, second.text
            # the same name again (a retry after a dropped connection): it replaces the first upload
            same = http.put(f"/v1/jobs/{job_id}/artifacts/a.bin", content=b"z", headers=headers)
            release.set()
            thread.join(30)
            assert same.status_code == 201, same.text
            assert results["first"] == 409  # the replaced upload stops at its next chunk: "upload_replaced"
            assert r.hget(keys.job_key(job_id), "artifact_bytes") == "1"
            assert not r.exists(keys.job_uploads_key(job_id))  # every reservation released
            assert not r.keys(f"cyxwiz:job:{job_id}:upload:*")  # no half upload left behind
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_full_store_answers_507_and_evicts_nothing(tmp_path: Path) -> None:
    store = EmbeddedValkey(tmp_path, persist=False, maxmemory_mb=16)
    store.start()
    proc = None
    try:
        admin_key, join_token = auth.new_token("cwk"), auth.new_token("cwj")
        install_credentials_at(store.url, admin_key, join_token)
        proc, url = start_gateway(store.gateway_url)
        client = redis.Redis.from_url(store.url, decode_responses=True)
        with httpx.Client(base_url=url, timeout=10) as http:
            job_id = submit(http, admin_key)["job_id"]
            assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
            assert client.config_get("maxmemory")["maxmemory"] == str(16 << 20)
            # full: below what it holds now (filling it by hand races the store's own buffers, which shrink)
            used = int(client.info("memory")["used_memory"])
            client.config_set("maxmemory", used - (256 << 10))
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                client.set("filler", "x" * 1024)
            before = keyspace(client)
            resp = http.post("/v1/jobs", json=DIGITS_SPEC, headers=bearer(admin_key))
            assert resp.status_code == 507, resp.text
            assert resp.json()["error"]["code"] == "insufficient_storage"
            assert keyspace(client) == before  # nothing written, and nothing evicted
            assert http.get(f"/v1/jobs/{job_id}", headers=bearer(admin_key)).status_code == 200
        client.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        store.stop()
