"""Job logs (docs/logs.md): a real node runtime ships what its job processes log and print, and the
tenant reads, tails and follows it; nodes append only to attempts they hold."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import pytest
import redis

from node_runtime.api import JobApi
from node_runtime.log_shipper import LogShipper, capture_output
from shared import keys
from tests.conftest import DIGITS_SPEC, KeepAlive, bearer, keyspace, register, submit
from tests.node_runtime.node_harness import Api, NodeProcess, long_digits, wait_until

pytestmark = pytest.mark.timeout(240)


def get_logs(http: httpx.Client, key: str, job_id: str, **params: str) -> httpx.Response:
    return http.get(f"/v1/jobs/{job_id}/logs", params=params, headers=bearer(key))


def log_text(http: httpx.Client, key: str, job_id: str, **params: str) -> str:
    resp = get_logs(http, key, job_id, **params)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "text/plain; charset=utf-8"
    return resp.text


def tenant_key(http: httpx.Client, admin_key: str, tenant: str) -> str:
    resp = http.post("/v1/keys", json={"tenant": tenant}, headers=bearer(admin_key))
    assert resp.status_code == 201, resp.text
    return str(resp.json()["api_key"])


def test_a_node_ships_the_jobs_log_and_the_tenant_reads_it(
        api: Api, http: httpx.Client, creds: dict[str, str], start_node: Callable[..., NodeProcess]) -> None:
    key = creds["api_key"]
    node = start_node()
    spec = {**DIGITS_SPEC, "name": "logged", "training": {**DIGITS_SPEC["training"], "epochs": 3}}
    job_id = api.submit(spec)
    job = api.wait_status(job_id, ("completed", "failed"), 120)
    assert job["status"] == "completed", job["error"]
    # the job process logs this after its final report; its log is flushed as it exits, and lines of the
    # attempt that ended the job are still taken
    def ended() -> str | None:
        text = log_text(http, key, job_id)
        return text if "reported completed" in text else None

    text = wait_until(ended, 60, what="the job's last line in its log")
    lines = text.splitlines()
    for line in lines:  # `<time> <line>`, the time in RFC 3339
        assert datetime.fromisoformat(line.split(" ", 1)[0]).tzinfo is not None, line
    summaries = [line for line in lines if "cyxwiz.train: epoch " in line]
    assert [s.split("cyxwiz.train: ")[1].split(":")[0] for s in summaries] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    for part in ("loss ", "accuracy ", "val_loss ", "val_accuracy ", "samples/s"):
        assert all(part in s for s in summaries), summaries
    assert any("cyxwiz.node.job: job " in line and " trained in " in line for line in lines), text
    assert "epoch 3/3: loss" in node.log()  # the runtime's own log still shows the job's output

    assert log_text(http, key, job_id, tail="2").splitlines() == lines[-2:]
    assert log_text(http, key, job_id, attempt="1") == text
    answer = get_logs(http, key, job_id, format="json", tail="3")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    assert answer.json()["job_id"] == job_id and answer.json()["attempt"] == 1
    assert [f"{entry['time']} {entry['line']}" for entry in answer.json()["lines"]] == lines[-3:]

    # a followed log of a job that has ended: everything, then the stream ends
    with http.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "1"}, headers=bearer(key)) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"] == "text/plain; charset=utf-8"
        assert resp.read().decode() == text

    for params, field in (({"attempt": "2"}, "attempt"), ({"attempt": "0"}, "attempt"), ({"tail": "0"}, "tail"),
                          ({"tail": str(keys.LOG_MAXLEN + 1)}, "tail"), ({"tail": "ten"}, "tail"),
                          ({"follow": "maybe"}, "follow"), ({"format": "xml"}, "format"),
                          ({"follow": "1", "format": "json"}, "format")):
        resp = get_logs(http, key, job_id, **params)
        assert resp.status_code == 422 and resp.json()["error"]["field"] == field, (params, resp.text)
    assert get_logs(http, tenant_key(http, key, "acme"), job_id).status_code == 404  # another tenant's job
    assert get_logs(http, "cwk_unknown", job_id).status_code == 401
    assert get_logs(http, key, "j-0123456789abcdef0123").status_code == 404

    # a job that fails through its own fault: its error is in its log
    refused = {**DIGITS_SPEC, "name": "refused-data", "dataset": {"url": "/etc/passwd", "format": "csv"}}
    failed_id = api.submit(refused)
    failed = api.wait_status(failed_id, ("completed", "failed"), 120)
    assert failed["status"] == "failed" and "no local dataset files" in failed["error"]
    wait_until(lambda: any(line.split(" ", 1)[1].startswith("ERROR cyxwiz.node.job: ") and failed["error"] in line
                           for line in log_text(http, key, failed_id).splitlines()), 60,
               what="the failure in the job's log")


def test_follow_streams_while_the_job_runs_and_ends_when_it_ends(
        api: Api, http: httpx.Client, creds: dict[str, str], start_node: Callable[..., NodeProcess]) -> None:
    key = creds["api_key"]
    start_node()
    job_id = api.submit(long_digits(300, "followed"))
    seen: list[str] = []
    cancelled = False
    timeout = httpx.Timeout(10, read=90)
    with http.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "1"}, headers=bearer(key),
                     timeout=timeout) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():  # ends when the stream does
            seen.append(line)
            if not cancelled and "cyxwiz.train: epoch 2/300: " in line:
                # the job still runs (a cancel of an ended job is 409), and its lines already came
                api.cancel(job_id)
                cancelled = True
    assert cancelled, seen
    assert api.job(job_id)["status"] == "cancelled"
    assert any("cyxwiz.train: epoch 1/300: " in line for line in seen)


def test_only_the_node_holding_the_attempt_appends_and_bad_batches_change_nothing(
        http: httpx.Client, api_url: str, creds: dict[str, str], r: redis.Redis) -> None:
    key = creds["api_key"]
    first = register(http, creds["join_token"])
    job_id = submit(http, key)["job_id"]
    second = register(http, creds["join_token"])

    def append(node: dict[str, Any], body: Any, **kwargs: Any) -> httpx.Response:
        return http.post(f"/v1/jobs/{job_id}/logs", json=body, headers=bearer(node["session_token"]), **kwargs)

    def lines(*texts: str) -> list[dict[str, str]]:
        return [{"time": "2026-01-31T13:00:00+01:00", "line": text} for text in texts]

    with KeepAlive(api_url, [first, second]):
        assert r.hget(keys.job_key(job_id), "node_id") == first["node_id"]
        resp = append(first, {"attempt": 1, "lines": lines("hello", "\x1b[31mred\x1b[0m\tand a tab", "x" * 3000)})
        assert resp.status_code == 200 and resp.json() == {"ok": True, "accepted": 3}, resp.text
        assert log_text(http, key, job_id).splitlines() == [
            "2026-01-31T12:00:00.000Z hello", "2026-01-31T12:00:00.000Z \\x1b[31mred\\x1b[0m\tand a tab",
            "2026-01-31T12:00:00.000Z " + "x" * 2000]

        def job_state() -> dict[str, Any]:  # (the nodes' heartbeats move their own keys meanwhile)
            return {k: v for k, v in keyspace(r).items() if k.startswith(keys.JOB)}

        before = job_state()
        refusals = [
            (append(second, {"attempt": 1, "lines": lines("not mine")}), 403, "forbidden", None),
            (append(first, {"attempt": 1, "lines": lines("x") * 501}), 422, "invalid_field", "lines"),
            (append(first, {"attempt": 1, "lines": [{"time": "yesterday", "line": "x"}]}), 422, "invalid_field",
             "lines.0.time"),
            (append(first, {"attempt": 1, "lines": [{"time": "2026-01-31T12:00:00", "line": "x"}]}), 422,
             "invalid_field", "lines.0.time"),  # no offset
            (append(first, {"attempt": 0, "lines": lines("x")}), 422, "invalid_field", "attempt"),
            (append(first, {"attempt": 1, "lines": [{"line": 5}]}), 422, "invalid_field", "lines.0.line"),
            (append(first, {"attempt": 1, "lines": lines("x"), "stream": "stdout"}), 422, "invalid_field", "stream"),
            (append(first, [1]), 400, "malformed_body", None),
            (http.post(f"/v1/jobs/{job_id}/logs", json={"attempt": 1, "lines": []}), 401, "unauthorized", None),
            (http.post(f"/v1/jobs/{job_id}/logs", json={"attempt": 1, "lines": []}, headers=bearer(key)), 401,
             "unauthorized", None),
        ]
        for resp, status, code, field in refusals:
            assert resp.status_code == status and resp.json()["error"]["code"] == code, resp.text
            assert resp.json()["error"].get("field") == field, resp.text
        assert job_state() == before

        # the first node hands the job back: attempt 2 is the second node's, and attempt 1 is stale
        report = {"attempt": 1, "seq": 1, "status": "queued"}
        resp = http.post(f"/v1/jobs/{job_id}/progress", json=report, headers=bearer(first["session_token"]))
        assert resp.status_code == 200, resp.text
        assert r.hmget(keys.job_key(job_id), ["attempt", "node_id"]) == ["2", second["node_id"]]
        resp = append(first, {"attempt": 1, "lines": lines("too late")})
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "stale_attempt", resp.text
        assert append(second, {"attempt": 2, "lines": lines("attempt two")}).status_code == 200
        assert log_text(http, key, job_id).splitlines() == ["2026-01-31T12:00:00.000Z attempt two"]
        assert len(log_text(http, key, job_id, attempt="1").splitlines()) == 3

        resp = http.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(key))
        assert resp.status_code == 202, resp.text
        resp = append(second, {"attempt": 2, "lines": lines("after the cancel")})
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "job_cancelled", resp.text


def test_the_shipper_drops_the_oldest_lines_with_a_marker_when_the_api_falls_behind(
        http: httpx.Client, api_url: str, creds: dict[str, str]) -> None:
    key = creds["api_key"]
    node = register(http, creds["join_token"])
    job_id = submit(http, key)["job_id"]
    with KeepAlive(api_url, [node]):
        api = JobApi(api_url, node["session_token"], job_id, 1)
        shipper = LogShipper(api.append_logs, max_lines=100)
        for index in range(250):  # not started yet: nothing leaves, as when the API is away
            shipper.write(f"line {index}")
        shipper.start()
        assert shipper.flush(60)
        shipper.write("two\nlines")
        shipper.write("progress 10%\rprogress 100%")  # a redrawn progress bar: what a terminal shows
        release = capture_output(shipper)
        try:
            print("printed", end="")  # shipped when its line ends
            print(" by the job")
            logging.getLogger("cyxwiz.test").warning("logged by the job")
        finally:
            release()
        assert shipper.close(60)
        api.close()
    shown = [line.split(" ", 1)[1] for line in log_text(http, key, job_id).splitlines()]
    assert shown[0] == "[cyxwiz] 150 lines dropped: the control plane took them too slowly"
    assert shown[1:101] == [f"line {index}" for index in range(150, 250)]
    assert shown[101:] == ["two", "lines", "progress 100%", "printed by the job",
                           "WARNING cyxwiz.test: logged by the job"]


def test_a_follow_moves_on_to_the_next_attempt_unless_one_was_asked_for(
        http: httpx.Client, api_url: str, creds: dict[str, str], r: redis.Redis) -> None:
    key = creds["api_key"]
    first = register(http, creds["join_token"])
    job_id = submit(http, key)["job_id"]
    second = register(http, creds["join_token"])
    followed: list[str] = []

    def append(node: dict[str, Any], attempt: int, text: str) -> None:
        resp = http.post(f"/v1/jobs/{job_id}/logs", json={"attempt": attempt, "lines": [{"line": text}]},
                         headers=bearer(node["session_token"]))
        assert resp.status_code == 200, resp.text

    def follow() -> None:
        with httpx.Client(base_url=api_url, timeout=httpx.Timeout(10, read=60)) as client, client.stream(
                "GET", f"/v1/jobs/{job_id}/logs", params={"follow": "1"}, headers=bearer(key)) as resp:
            assert resp.status_code == 200
            followed.extend(line.split(" ", 1)[1] for line in resp.iter_lines())

    with KeepAlive(api_url, [first, second]):
        append(first, 1, "one")
        reader = threading.Thread(target=follow)
        reader.start()
        wait_until(lambda: followed == ["one"], 30, what="the first attempt's line in the follow")
        resp = http.post(f"/v1/jobs/{job_id}/progress", json={"attempt": 1, "seq": 1, "status": "queued"},
                         headers=bearer(first["session_token"]))  # handed back: attempt 2 goes to the second node
        assert resp.status_code == 200 and r.hget(keys.job_key(job_id), "node_id") == second["node_id"]
        # attempt 1 asked for by number: its follow ends, as no line can come to it any more
        with http.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "1", "attempt": "1"},
                         headers=bearer(key)) as resp:
            assert [line.split(" ", 1)[1] for line in resp.iter_lines()] == ["one"]
        append(second, 2, "two")
        wait_until(lambda: followed[-1:] == ["two"], 30, what="the second attempt's line in the follow")
        assert http.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(key)).status_code == 202
        reader.join(60)
        assert not reader.is_alive()
    assert followed == ["one", "--- attempt 2 ---", "two"]
