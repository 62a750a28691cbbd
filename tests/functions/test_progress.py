"""Progress function: reports (idempotent, fenced), completion, artifacts with Range, SSE."""

from __future__ import annotations

import json
import os

import httpx
import redis

from tests.conftest import DIGITS_SPEC, bearer, keyspace, model_weights, register, submit


def report(http: httpx.Client, token: str, job_id: str, **body: object) -> httpx.Response:
    return http.post(f"/v1/jobs/{job_id}/progress", json=body, headers=bearer(token))


def upload(http: httpx.Client, token: str, job_id: str, data: bytes, name: str = "model.safetensors",
           attempt: int | None = None) -> httpx.Response:
    headers = bearer(token) | ({"X-CyxWiz-Attempt": str(attempt)} if attempt else {})
    return http.put(f"/v1/jobs/{job_id}/artifacts/{name}", content=data, headers=headers)


def test_full_lifecycle(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    reg = register(http, creds["join_token"], "node", slots=1)
    token, key = reg["session_token"], creds["api_key"]
    job_id = submit(http, key)["job_id"]
    waiting = submit(http, key)["job_id"]
    assert report(http, token, job_id, attempt=1, seq=1, status="running", epoch=1, step=5, total_steps=20,
                  metrics={"loss": 2.0}).json() == {"ok": True, "status": "running", "duplicate": False}
    assert report(http, token, job_id, attempt=1, seq=1, status="running").json()["duplicate"] is True
    report(http, token, job_id, attempt=1, seq=2, status="running", epoch=2, step=10, total_steps=20,
           metrics={"loss": 1.0})
    job = http.get(f"/v1/jobs/{job_id}", headers=bearer(key)).json()
    assert job["status"] == "running" and job["started_at"] and job["progress"]["step"] == 10
    early = report(http, token, job_id, attempt=1, seq=3, status="completed")
    assert early.status_code == 409 and early.json()["error"]["code"] == "missing_artifact"
    weights = model_weights()
    assert upload(http, token, job_id, weights, attempt=1).status_code == 201
    done = report(http, token, job_id, attempt=1, seq=4, status="completed", epoch=2, step=20, total_steps=20,
                  metrics={"loss": 0.5, "val_accuracy": 0.97}, artifacts=["model.safetensors"])
    assert done.json()["status"] == "completed"
    job = http.get(f"/v1/jobs/{job_id}", headers=bearer(key)).json()
    assert job["status"] == "completed" and job["finished_at"] and job["artifacts"] == ["model.safetensors"]
    assert job["progress"]["metrics"]["val_accuracy"] == 0.97
    # the slot went to the queued job; success raised reputation
    assert http.get(f"/v1/jobs/{waiting}", headers=bearer(key)).json()["node_id"] == reg["node_id"]
    assert float(r.hget("cyxwiz:reputation", "node")) > 0.75
    events = http.get(f"/v1/jobs/{job_id}/progress", headers=bearer(key)).json()["events"]
    assert [e["seq"] for e in events] == [1, 2, 4] and [e["metrics"]["loss"] for e in events] == [2.0, 1.0, 0.5]
    assert http.get(f"/v1/jobs/{job_id}/artifacts/model.safetensors", headers=bearer(key)).content == weights
    late = report(http, token, job_id, attempt=1, seq=5, status="running")
    assert late.status_code == 409 and late.json()["error"]["code"] == "job_terminal"


def test_range_requests(http: httpx.Client, creds: dict[str, str]) -> None:
    reg = register(http, creds["join_token"])
    job_id = submit(http, creds["api_key"])["job_id"]
    data = os.urandom(1_200_000)  # spans three chunks
    upload(http, reg["session_token"], job_id, data, name="data.bin")
    url, key = f"/v1/jobs/{job_id}/artifacts/data.bin", bearer(creds["api_key"])
    for header, expected in (("bytes=0-9", data[:10]), ("bytes=524280-524300", data[524280:524301]),
                             ("bytes=1199990-", data[1199990:]), ("bytes=-5", data[-5:]),
                             ("bytes=1000000-9999999", data[1000000:])):
        resp = http.get(url, headers=key | {"Range": header})
        assert resp.status_code == 206 and resp.content == expected, header
        assert resp.headers["content-range"].endswith(f"/{len(data)}")
    resp = http.get(url, headers=key | {"Range": "bytes=2000000-"})
    assert resp.status_code == 416 and resp.headers["content-range"] == f"bytes */{len(data)}"
    assert http.get(url, headers=key).headers["accept-ranges"] == "bytes"


def test_node_cannot_touch_other_nodes_jobs(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    a = register(http, creds["join_token"], "a")
    job_id = submit(http, creds["api_key"])["job_id"]
    b = register(http, creds["join_token"], "b")
    before = keyspace(r)
    resp = report(http, b["session_token"], job_id, attempt=1, seq=1, status="running")
    assert resp.status_code == 403
    assert upload(http, b["session_token"], job_id, b"x").status_code == 403
    assert http.get(f"/v1/jobs/{job_id}/artifacts/model.safetensors",
                    headers=bearer(b["session_token"])).status_code == 403
    assert report(http, creds["api_key"], job_id, attempt=1, seq=1).status_code == 401
    assert report(http, a["session_token"], "j-nope", attempt=1, seq=1).status_code == 404
    assert keyspace(r) == before


def test_stale_attempt_is_fenced(http: httpx.Client, creds: dict[str, str]) -> None:
    reg = register(http, creds["join_token"], slots=1)
    token = reg["session_token"]
    job_id = submit(http, creds["api_key"])["job_id"]
    failed = report(http, token, job_id, attempt=1, seq=1, status="failed", error="CUDA error", fault="node")
    assert failed.json()["status"] in ("queued", "assigned")  # retried: attempt 2
    job = http.get(f"/v1/jobs/{job_id}", headers=bearer(creds["api_key"])).json()
    assert job["attempt"] == 2
    stale = report(http, token, job_id, attempt=1, seq=2, status="running")
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "stale_attempt"
    stale_upload = upload(http, token, job_id, b"old weights", attempt=1)
    assert stale_upload.status_code == 409 and stale_upload.json()["error"]["code"] == "stale_attempt"


def test_job_fault_is_not_retried(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    reg = register(http, creds["join_token"], "node")
    job_id = submit(http, creds["api_key"])["job_id"]
    report(http, reg["session_token"], job_id, attempt=1, seq=1, status="failed", error="bad data", fault="job")
    job = http.get(f"/v1/jobs/{job_id}", headers=bearer(creds["api_key"])).json()
    assert job["status"] == "failed" and job["error"] == "bad data" and job["attempt"] == 1
    assert float(r.hget("cyxwiz:reputation", "node")) == 0.75  # the job's fault costs the node nothing


def test_retries_end_in_failed(http: httpx.Client, creds: dict[str, str]) -> None:
    reg = register(http, creds["join_token"])
    job_id = submit(http, creds["api_key"], max_attempts=2)["job_id"]
    for attempt in (1, 2):
        report(http, reg["session_token"], job_id, attempt=attempt, seq=1, status="failed", error="segfault",
               fault="node")
    job = http.get(f"/v1/jobs/{job_id}", headers=bearer(creds["api_key"])).json()
    assert job["status"] == "failed" and "max_attempts" in job["error"]


def test_cancelled_job_answers_409(http: httpx.Client, creds: dict[str, str]) -> None:
    reg = register(http, creds["join_token"])
    job_id = submit(http, creds["api_key"])["job_id"]
    http.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(creds["api_key"]))
    resp = report(http, reg["session_token"], job_id, attempt=1, seq=1, status="running")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "job_cancelled"


def test_hand_back_requeues_without_spending_attempts(http: httpx.Client, creds: dict[str, str]) -> None:
    reg = register(http, creds["join_token"])
    job_id = submit(http, creds["api_key"], max_attempts=1)["job_id"]
    http.delete(f"/v1/nodes/{reg['node_id']}", headers=bearer(reg["session_token"]))
    report(http, reg["session_token"], job_id, attempt=1, seq=1, status="queued")
    job = http.get(f"/v1/jobs/{job_id}", headers=bearer(creds["api_key"])).json()
    assert job["status"] == "queued" and job["attempt"] == 2
    other = register(http, creds["join_token"], "other")
    assert http.get(f"/v1/jobs/{job_id}", headers=bearer(creds["api_key"])).json()["node_id"] == other["node_id"]


def test_bad_reports_change_nothing(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    reg = register(http, creds["join_token"])
    job_id = submit(http, creds["api_key"])["job_id"]
    before = keyspace(r)
    for body, field in (({"seq": 1}, "attempt"), ({"attempt": 1, "seq": 1, "status": "done"}, "status"),
                        ({"attempt": 1, "seq": 1, "status": "failed"}, "error"),
                        ({"attempt": 1, "seq": 1, "metrics": {"loss": "low"}}, "metrics"),
                        ({"attempt": 0, "seq": 1}, "attempt"), ({"attempt": 1, "seq": 1, "extra": 1}, "extra")):
        resp = report(http, reg["session_token"], job_id, **body)
        assert resp.status_code == 422 and resp.json()["error"]["field"] == field, resp.text
    resp = http.post(f"/v1/jobs/{job_id}/progress", content=b"{", headers=bearer(reg["session_token"]))
    assert resp.status_code == 400
    assert upload(http, reg["session_token"], job_id, b"x", name="../etc").status_code in (404, 422)
    assert upload(http, reg["session_token"], job_id, b"x", name="bad name!").status_code == 422
    assert keyspace(r) == before


def test_artifact_caps(api_url: str, creds: dict[str, str], redis_url: str, r: redis.Redis) -> None:
    from tests.conftest import start_gateway

    proc, url = start_gateway(redis_url, {"CYXWIZ_MAX_ARTIFACT_BYTES": "1000", "CYXWIZ_MAX_JOB_ARTIFACT_BYTES": "1500"})
    try:
        with httpx.Client(base_url=url) as http:
            reg = register(http, creds["join_token"])
            job_id = submit(http, creds["api_key"])["job_id"]
            assert upload(http, reg["session_token"], job_id, b"x" * 1001, name="a.bin").status_code == 413
            assert upload(http, reg["session_token"], job_id, b"x" * 1000, name="a.bin").status_code == 201
            over = upload(http, reg["session_token"], job_id, b"x" * 600, name="b.bin")
            assert over.status_code == 413
            assert upload(http, reg["session_token"], job_id, b"y" * 900, name="a.bin").status_code == 201  # replaces
            assert not r.keys("cyxwiz:job:*:upload:*")  # no half uploads left behind
    finally:
        proc.terminate()
        proc.wait()


def test_event_stream(http: httpx.Client, creds: dict[str, str]) -> None:
    reg = register(http, creds["join_token"])
    job_id = submit(http, creds["api_key"])["job_id"]
    report(http, reg["session_token"], job_id, attempt=1, seq=1, status="running", step=1, metrics={"loss": 1.0})
    upload(http, reg["session_token"], job_id, model_weights())
    report(http, reg["session_token"], job_id, attempt=1, seq=2, status="completed", step=2, metrics={"loss": 0.5})
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=bearer(creds["api_key"])) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        text = "".join(resp.iter_text())
    kinds = [line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event: ")]
    assert kinds == ["status", "progress", "progress"]  # where the job stands first, then its history
    assert '"status":"completed"' in text


def test_unreliable_node_cools_off_then_returns(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    import time

    reg = register(http, creds["join_token"], "flaky")
    job_id = submit(http, creds["api_key"], max_attempts=10)["job_id"]
    for attempt in range(1, 6):  # 0.75 x 0.8^5 = 0.246: below the 0.3 floor
        resp = report(http, reg["session_token"], job_id, attempt=attempt, seq=1, status="failed",
                      error="segfault", fault="node")
        assert resp.status_code == 200, resp.text
        http.post(f"/v1/nodes/{reg['node_id']}/heartbeat", headers=bearer(reg["session_token"]))
    assert float(r.hget("cyxwiz:reputation", "flaky")) < 0.3 and r.hexists("cyxwiz:cooloff", "flaky")
    job = http.get(f"/v1/jobs/{job_id}", headers=bearer(creds["api_key"])).json()
    assert job["status"] == "queued" and job["attempt"] == 6  # the idle node is cooling off: not scheduled
    assert r.zscore("cyxwiz:nodes:free:cpu", reg["node_id"]) is None
    deadline = time.monotonic() + 10  # the test gateway cools nodes off for 5 s
    while time.monotonic() < deadline and job["status"] == "queued":
        http.post(f"/v1/nodes/{reg['node_id']}/heartbeat", headers=bearer(reg["session_token"]))
        job = http.get(f"/v1/jobs/{job_id}", headers=bearer(creds["api_key"])).json()
        time.sleep(0.3)
    assert job["status"] == "assigned" and job["node_id"] == reg["node_id"]


def test_unknown_token_is_401_whether_or_not_the_job_exists(http: httpx.Client, creds: dict[str, str]) -> None:
    register(http, creds["join_token"])
    job_id = submit(http, creds["api_key"])["job_id"]
    for job in (job_id, "j-0123456789abcdef0123"):
        resp = http.get(f"/v1/jobs/{job}/artifacts/model.safetensors", headers=bearer("cwk_unknown"))
        assert resp.status_code == 401, job


def test_upload_refused_before_the_body_is_stored(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    register(http, creds["join_token"], "holder")
    job_id = submit(http, creds["api_key"])["job_id"]
    other = register(http, creds["join_token"], "other")
    resp = upload(http, other["session_token"], job_id, b"x" * 2_000_000)
    assert resp.status_code == 403 and not r.keys("cyxwiz:job:*:upload:*")


def test_drained_node_leaves_once_its_last_job_ends(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    reg = register(http, creds["join_token"], "drained")
    job_id = submit(http, creds["api_key"])["job_id"]
    assert http.delete(f"/v1/nodes/{reg['node_id']}", headers=bearer(creds["api_key"])).json()["status"] == "draining"
    upload(http, reg["session_token"], job_id, model_weights())
    report(http, reg["session_token"], job_id, attempt=1, seq=1, status="completed")
    assert not r.exists(f"cyxwiz:node:{reg['node_id']}") and r.zscore("cyxwiz:nodes:deadline", reg["node_id"]) is None
    assert float(r.hget("cyxwiz:reputation", "drained")) > 0.75  # left cleanly: no lapse penalty


def test_event_streams_are_capped_per_tenant_and_never_starve_the_api(redis_url: str, creds: dict[str, str]) -> None:
    import asyncio

    from tests.conftest import start_gateway

    proc, url = start_gateway(redis_url, {"CYXWIZ_MAX_EVENT_STREAMS": "6", "CYXWIZ_MAX_EVENT_STREAMS_PER_TENANT": "3"})

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            created = await client.post("/v1/jobs", json=DIGITS_SPEC, headers=bearer(creds["api_key"]))
            job_id = created.json()["job_id"]
            streams, answers = [], []
            for _ in range(4):  # a queued job's stream stays open
                stream = client.stream("GET", f"/v1/jobs/{job_id}/events", headers=bearer(creds["api_key"]))
                answers.append(await stream.__aenter__())
                streams.append(stream)
            assert [a.status_code for a in answers] == [200, 200, 200, 429]
            assert answers[3].headers["retry-after"] == "5"
            other = await client.post("/v1/keys", json={"tenant": "other"}, headers=bearer(creds["api_key"]))
            resp = await client.get("/v1/jobs", headers=bearer(other.json()["api_key"]))  # the API still answers
            assert resp.status_code == 200
            for stream in streams:
                await stream.__aexit__(None, None, None)
            await asyncio.sleep(0.5)  # closed streams are counted out: a new one is admitted
            async with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=bearer(creds["api_key"])) as again:
                assert again.status_code == 200

    try:
        asyncio.run(scenario())
    finally:
        proc.terminate()
        proc.wait()


def test_missing_artifact_is_404_for_user_and_node(http: httpx.Client, creds: dict[str, str]) -> None:
    reg = register(http, creds["join_token"])
    job_id = submit(http, creds["api_key"])["job_id"]
    for token in (creds["api_key"], reg["session_token"]):
        resp = http.get(f"/v1/jobs/{job_id}/artifacts/checkpoint.safetensors", headers=bearer(token))
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


def test_event_stream_slots_come_back_when_the_store_fails_mid_stream(redis_url: str, creds: dict[str, str],
                                                                      r: redis.Redis) -> None:
    """A stream that dies of a store error mid-stream is counted out like one that ends: the tenant can
    open its full quota again afterwards (the slot used to leak until the gateway restarted)."""
    import asyncio
    import contextlib

    from shared import keys
    from tests.conftest import start_gateway

    proc, url = start_gateway(redis_url, {"CYXWIZ_MAX_EVENT_STREAMS_PER_TENANT": "2"})
    auth = bearer(creds["api_key"])

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            job_id = (await client.post("/v1/jobs", json=DIGITS_SPEC, headers=auth)).json()["job_id"]
            path = f"/v1/jobs/{job_id}/events"
            streams = [client.stream("GET", path, headers=auth) for _ in range(2)]
            answers = [await stream.__aenter__() for stream in streams]
            assert [a.status_code for a in answers] == [200, 200]
            async with client.stream("GET", path, headers=auth) as third:
                assert third.status_code == 429  # the quota is full
            r.set(keys.job_progress_key(job_id), "not a stream")  # every stream's next XREAD: WRONGTYPE
            for answer in answers:
                with contextlib.suppress(httpx.HTTPError):
                    async for _ in answer.aiter_bytes():
                        pass
            for stream in streams:
                await stream.__aexit__(None, None, None)
            r.delete(keys.job_progress_key(job_id))
            await asyncio.sleep(0.3)
            again = [client.stream("GET", path, headers=auth) for _ in range(2)]
            statuses = [(await stream.__aenter__()).status_code for stream in again]
            for stream in again:
                await stream.__aexit__(None, None, None)
            assert statuses == [200, 200]

    try:
        asyncio.run(scenario())
    finally:
        proc.terminate()
        proc.wait()


def test_artifact_names_are_matched_whole(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    reg = register(http, creds["join_token"])
    job_id = submit(http, creds["api_key"])["job_id"]
    before = keyspace(r)
    for name in ("model.safetensors%0A", "model.safetensors%0D%0A", "%0Amodel.safetensors", "model%1B.safetensors"):
        resp = upload(http, reg["session_token"], job_id, b"w", name=name)
        assert resp.status_code in (404, 422), (name, resp.text)
    assert keyspace(r) == before


def test_insane_progress_is_refused_and_changes_nothing(http: httpx.Client, creds: dict[str, str],
                                                        r: redis.Redis) -> None:
    reg = register(http, creds["join_token"])
    job_id = submit(http, creds["api_key"])["job_id"]
    base = {"attempt": 1, "seq": 1, "status": "running"}
    before = keyspace(r)
    for extra, field in (
        ({"epoch": -1}, "epoch"), ({"step": -1}, "step"), ({"total_steps": -1}, "total_steps"),
        ({"step": 11, "total_steps": 10}, "step"), ({"step": 2**53 + 1}, "step"), ({"epoch": 2**53 + 1}, "epoch"),
        ({"step": 2**60, "total_steps": 2**61}, "step"), ({"total_steps": 2**53 + 1}, "total_steps"),
        ({"metrics": {"accuracy": 1.5}}, "metrics.accuracy"),
        ({"metrics": {"val_accuracy": -0.1}}, "metrics.val_accuracy"),
        ({"metrics": {"top5_acc": 2}}, "metrics.top5_acc"), ({"metrics": {"loss": -0.5}}, "metrics.loss"),
        ({"metrics": {"val_loss": -1}}, "metrics.val_loss"), ({"metrics": {"loss": True}}, "metrics"),
        ({"metrics": {"loss": "nan"}}, "metrics"),
        ({"metrics": {f"m{i}": 1.0 for i in range(65)}}, "metrics"), ({"metrics": {"x" * 65: 1.0}}, "metrics"),
        ({"metrics": {"bad name": 1.0}}, "metrics"), ({"metrics": {"loss\x1b[31m": 1.0}}, "metrics"),
        ({"metrics": {"": 1.0}}, "metrics"), ({"metrics": {"loss\n": 1.0}}, "metrics"),
    ):
        resp = report(http, reg["session_token"], job_id, **base, **extra)
        assert resp.status_code == 422, (extra, resp.text)
        assert resp.json()["error"]["field"] == field, (extra, resp.text)
    assert keyspace(r) == before


def test_what_real_nodes_report_is_accepted(http: httpx.Client, creds: dict[str, str]) -> None:
    """The metrics the node runtime's training loop and job process send (node_runtime/training/loop.py,
    node_runtime/job_process.py) all pass the sanity rules, including None for a non-finite value."""
    reg = register(http, creds["join_token"])
    job_id = submit(http, creds["api_key"])["job_id"]
    metrics = {"loss": 0.42, "accuracy": 0.9, "val_loss": None, "val_accuracy": 1.0, "samples_per_s": 5120.5,
               "tokens_per_s": 0.0, "gpu_memory_mb": 80123, "resumed_from_step": 0, "checkpoint_step": 1200,
               "perplexity": 1e6, "lr": 3e-4, "grad_norm": 0.0}
    for seq, body in enumerate(({"epoch": 0, "step": 0, "total_steps": 0, "metrics": {}},
                                {"epoch": 1, "step": 5, "total_steps": 0, "metrics": metrics},
                                {"epoch": 3, "step": 2**40, "total_steps": 2**40, "metrics": metrics}), start=1):
        resp = report(http, reg["session_token"], job_id, attempt=1, seq=seq, status="running", **body)
        assert resp.status_code == 200, resp.text


def test_progress_event_error_is_truncated(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    from shared import keys
    from shared.jobs import MAX_ERROR_CHARS

    reg = register(http, creds["join_token"])
    job_id = submit(http, creds["api_key"])["job_id"]
    error = "E" * 200_000
    resp = report(http, reg["session_token"], job_id, attempt=1, seq=1, status="failed", error=error, fault="job")
    assert resp.status_code == 200, resp.text
    events = http.get(f"/v1/jobs/{job_id}/progress", headers=bearer(creds["api_key"])).json()["events"]
    assert events[-1]["error"] == "E" * MAX_ERROR_CHARS == error[:4000]
    assert http.get(f"/v1/jobs/{job_id}", headers=bearer(creds["api_key"])).json()["error"] == error[:MAX_ERROR_CHARS]
    assert max(len(fields["event"]) for _, fields in r.xrange(keys.job_progress_key(job_id))) < 5000


def test_progress_is_paged(http: httpx.Client, creds: dict[str, str]) -> None:
    reg = register(http, creds["join_token"])
    job_id = submit(http, creds["api_key"])["job_id"]
    for seq in range(1, 6):
        report(http, reg["session_token"], job_id, attempt=1, seq=seq, status="running", step=seq, total_steps=10)
    key, url = bearer(creds["api_key"]), f"/v1/jobs/{job_id}/progress"
    everything = http.get(url, headers=key).json()
    assert [e["seq"] for e in everything["events"]] == [1, 2, 3, 4, 5] and everything["next_cursor"] is None
    seen, cursor, pages = [], None, 0
    while True:
        query = {"limit": 2} | ({"after": cursor} if cursor else {})
        page = http.get(url, params=query, headers=key).json()
        seen += [e["seq"] for e in page["events"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [1, 2, 3, 4, 5] and pages == 3
    exact = http.get(url, params={"limit": 5}, headers=key).json()
    assert len(exact["events"]) == 5 and exact["next_cursor"] is None  # no empty page at the end
    last = http.get(url, params={"limit": 4}, headers=key).json()
    assert http.get(url, params={"after": last["next_cursor"]}, headers=key).json() == {
        "events": [everything["events"][-1]], "next_cursor": None}
    for query, field in (({"limit": 0}, "limit"), ({"limit": 2001}, "limit"), ({"limit": "x"}, "limit"),
                         ({"limit": -1}, "limit"), ({"limit": "9" * 30}, "limit"), ({"after": "abc"}, "after"),
                         ({"after": "1-"}, "after"), ({"after": "-"}, "after"), ({"after": "1-2-3"}, "after"),
                         ({"after": "1-2\n"}, "after"), ({"after": "+"}, "after"), ({"after": "1"}, "after"),
                         ({"after": "99999999999999999999999-0"}, "after"), ({"after": "١-٢"}, "after")):
        resp = http.get(url, params=query, headers=key)
        assert resp.status_code == 422 and resp.json()["error"]["field"] == field, (query, resp.text)
    assert http.get(url, params={"limit": 2000}, headers=key).status_code == 200


def test_models_and_checkpoints_are_checked_as_they_arrive(http: httpx.Client, creds: dict[str, str],
                                                           r: redis.Redis) -> None:
    """422 invalid_artifact, nothing stored, for an upload that is not a model of the job's spec; the
    accepted one is recorded with its digest (docs/verification.md)."""
    reg = register(http, creds["join_token"], "checked")
    job_id = submit(http, creds["api_key"])["job_id"]
    other = {**DIGITS_SPEC, "model": {"type": "mlp", "hidden": [7]}}
    for name, data, says in (("model.safetensors", b"x", "not a safetensors file"),
                             ("model.safetensors", b"\x10" + bytes(7) + b'{"a": 1}' + bytes(8), "header"),
                             ("model.safetensors", model_weights(other), "another spec"),
                             ("checkpoint.safetensors", model_weights(), "not a CyxWiz training checkpoint")):
        resp = upload(http, reg["session_token"], job_id, data, name=name, attempt=1)
        assert resp.status_code == 422, (name, resp.text)
        assert resp.json()["error"]["code"] == "invalid_artifact" and says in resp.json()["error"]["message"]
        assert not r.keys(f"cyxwiz:job:{job_id}:artifact:*") and not r.keys(f"cyxwiz:job:{job_id}:upload:*")
    assert upload(http, reg["session_token"], job_id, model_weights(), attempt=1).status_code == 201
    final = r.hget(f"cyxwiz:job:{job_id}", "final:1")
    assert final and len(json.loads(final)["weights"]) == 64
