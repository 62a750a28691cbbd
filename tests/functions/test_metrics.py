"""GET /metrics: who may read it, cluster numbers equal to what was done through the API, the request
latency histogram, and a real Prometheus server scraping it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from cyxwiz.embedded import EmbeddedValkey, free_port
from cyxwiz.server import wait_healthy
from shared import keys
from tests.conftest import GPU_CAPS, REPO, TEST_ENV, bearer, register, start_gateway, submit

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]
HISTOGRAM = "cyxwiz_http_request_duration_seconds"


def scrape(http: httpx.Client, api_key: str) -> Samples:
    """Every sample of one scrape: name -> (sorted label pairs) -> value."""
    resp = http.get("/metrics", headers=bearer(api_key))
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def series(samples: Samples, name: str, *label_names: str) -> dict[tuple[str, ...], float]:
    """One metric's samples keyed by the values of ``label_names``, in that order."""
    return {tuple(dict(labels)[n] for n in label_names): value for labels, value in samples[name].items()}


def scalar(samples: Samples, name: str) -> float:
    return samples[name][()]


def tenant_key(http: httpx.Client, admin_key: str, tenant: str) -> str:
    resp = http.post("/v1/keys", json={"tenant": tenant}, headers=bearer(admin_key))
    assert resp.status_code == 201, resp.text
    return resp.json()["api_key"]  # type: ignore[no-any-return]


def test_metrics_needs_an_admin_key(http: httpx.Client, creds: dict[str, str]) -> None:
    for headers, status, code in [({}, 401, "unauthorized"),
                                  (bearer("cwk_not-a-key"), 401, "unauthorized"),
                                  (bearer(tenant_key(http, creds["api_key"], "acme")), 403, "forbidden")]:
        resp = http.get("/metrics", headers=headers)
        assert resp.status_code == status and resp.json()["error"]["code"] == code, resp.text
    assert scrape(http, creds["api_key"])


@pytest.fixture(scope="module")
def steady_http(valkey: EmbeddedValkey) -> Iterator[httpx.Client]:
    """A gateway whose nodes live for ten minutes without heartbeats, so node counts hold still for
    the length of a test (the session gateway's nodes lapse after 2 s)."""
    proc, url = start_gateway(valkey.gateway_url, {"CYXWIZ_TTL_S": "600"})
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            yield client
    finally:
        proc.terminate()
        proc.wait(10)


def test_cluster_metrics_equal_what_was_done(steady_http: httpx.Client, creds: dict[str, str],
                                             r: redis.Redis) -> None:
    http, key = steady_http, creds["api_key"]
    empty = scrape(http, key)
    assert set(series(empty, "cyxwiz_nodes", "status", "class").values()) == {0}
    assert scalar(empty, "cyxwiz_jobs_submitted_total") == 0

    cpu = {name: register(http, creds["join_token"], name, slots=1) for name in ("c1", "c2", "c3", "c4")}
    gpu = register(http, creds["join_token"], "g1", slots=1, capabilities=GPU_CAPS)
    on_gpu = submit(http, key, requirements={"gpu": True})
    on_cpu = [submit(http, key) for _ in range(2)]  # the GPU node is full: two CPU nodes take one each
    assert on_gpu["node_id"] == gpu["node_id"] and {j["status"] for j in on_cpu} == {"assigned"}
    by_id = {reg["node_id"]: name for name, reg in cpu.items()}
    busy, draining = (by_id[j["node_id"]] for j in on_cpu)
    sick, lapsed = sorted(set(cpu) - {busy, draining})
    high = [submit(http, key, requirements={"gpu": True}, priority="high") for _ in range(2)]
    submit(http, key, requirements={"gpu": True}, priority="low")
    parked = submit(http, key, requirements={"gpu": True, "min_gpu_memory_mb": 10_000_000})  # fits no node
    assert {j["status"] for j in [*high, parked]} == {"queued"}
    assert r.zscore(keys.QUEUE_PARKED, parked["job_id"]) is not None
    assert http.post(f"/v1/jobs/{high[0]['job_id']}/cancel", headers=bearer(key)).status_code == 202
    # node states: one reports it cannot read its stream, one has lapsed (its last heartbeat set long ago;
    # the reaper goes by its deadline, ten minutes away), one drains around its running job, and an idle
    # one joins (it takes no GPU job). The GPU node stays: without it the queued GPU jobs would be parked.
    beat = http.post(f"/v1/nodes/{cpu[sick]['node_id']}/heartbeat", json={"stream_error": "NOPERM"},
                     headers=bearer(cpu[sick]["session_token"]))
    assert beat.status_code == 200, beat.text
    r.hset(keys.node_key(cpu[lapsed]["node_id"]), "last_heartbeat_ms", 1)
    drained = http.delete(f"/v1/nodes/{cpu[draining]['node_id']}", headers=bearer(key))
    assert drained.status_code == 202 and drained.json()["status"] == "draining"
    register(http, creds["join_token"], "idle", slots=3)

    got = scrape(http, key)
    nodes = {k: v for k, v in series(got, "cyxwiz_nodes", "status", "class").items() if v}
    assert nodes == {("online", "cpu"): 2, ("online", "gpu"): 1, ("unhealthy", "cpu"): 1, ("offline", "cpu"): 1,
                     ("draining", "cpu"): 1}
    assert len(series(got, "cyxwiz_nodes", "status", "class")) == 8  # every status x class, zeros included
    assert series(got, "cyxwiz_slots", "state") == {("used",): 3, ("free",): 3, ("unavailable",): 2}
    queue = {k: v for k, v in series(got, "cyxwiz_queue_jobs", "class", "priority").items() if v}
    assert queue == {("gpu", "high"): 1, ("gpu", "low"): 1}
    assert len(series(got, "cyxwiz_queue_jobs", "class", "priority")) == 6
    assert scalar(got, "cyxwiz_queue_parked_jobs") == 1
    assert series(got, "cyxwiz_jobs", "status") == {
        ("queued",): 3, ("assigned",): 3, ("running",): 0, ("completed",): 0, ("failed",): 0, ("cancelled",): 1}
    assert scalar(got, "cyxwiz_jobs_submitted_total") == 7
    assert series(got, "cyxwiz_jobs_finished_total", "status") == {
        ("cancelled",): 1, ("completed",): 0, ("failed",): 0}
    assert scalar(got, "cyxwiz_reassignments_total") == 0 and scalar(got, "cyxwiz_nodes_reaped_total") == 0
    assert scalar(got, "cyxwiz_verification_tasks_queued") == 0 and scalar(got, "cyxwiz_nodes_banned") == 0

    # the ban gauge reads the banned identities (audits, which ban, have their own tests: tests/node_runtime)
    r.hset(keys.NODES_BANNED, "mallory", "failed an audit")
    assert scalar(scrape(http, key), "cyxwiz_nodes_banned") == 1


def delta(before: Samples, after: Samples, labels: tuple[str, str, str, str]) -> float:
    """How many requests of (function, route, method, status) the histogram counted in between."""
    was = series(before, HISTOGRAM + "_count", "function", "route", "method", "status").get(labels, 0)
    return series(after, HISTOGRAM + "_count", "function", "route", "method", "status")[labels] - was


def test_request_latency_histogram(http: httpx.Client, creds: dict[str, str]) -> None:
    key = creds["api_key"]
    job_id = submit(http, key)["job_id"]
    before = scrape(http, key)
    assert http.get("/v1/jobs/j-00000000000000000000", headers=bearer(key)).status_code == 404
    assert http.get(f"/v1/jobs/{job_id}", headers=bearer(key)).status_code == 200
    assert http.get(f"/v1/jobs/{job_id}", headers=bearer(key)).status_code == 200
    assert http.put("/v1/jobs", headers=bearer(key)).status_code == 405
    assert http.get("/no/such/path/j-00000000000000000000").status_code == 404
    assert http.post("/v1/nodes/n-0000000000000000/heartbeat", headers=bearer("cwn.x.y")).status_code == 401
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=bearer(key)) as stream:
        assert stream.status_code == 200
        assert next(stream.iter_lines()).startswith("event: status")
        # still open, and already counted: a stream is timed until its response started
        assert delta(before, scrape(http, key), ("progress", "/v1/jobs/{job_id}/events", "GET", "200")) == 1
    after = scrape(http, key)

    assert delta(before, after, ("submit", "/v1/jobs/{job_id}", "GET", "404")) == 1
    assert delta(before, after, ("submit", "/v1/jobs/{job_id}", "GET", "200")) == 2
    assert delta(before, after, ("submit", "/v1/jobs", "PUT", "405")) == 1
    assert delta(before, after, ("gateway", "unmatched", "GET", "404")) == 1
    assert delta(before, after, ("heartbeat", "/v1/nodes/{node_id}/heartbeat", "POST", "401")) == 1
    assert delta(before, after, ("gateway", "/metrics", "GET", "200")) == 2  # the scrapes before this one
    routes = {dict(labels)["route"] for labels in after[HISTOGRAM + "_count"]}
    assert not any("j-" in route or "n-" in route for route in routes), routes
    buckets = series(after, HISTOGRAM + "_bucket", "function", "route", "method", "status", "le")
    assert buckets[("submit", "/v1/jobs/{job_id}", "GET", "200", "+Inf")] >= 2


def test_worker_processes_add_up(valkey: EmbeddedValkey, creds: dict[str, str], tmp_path: Path) -> None:
    """Two Hypercorn workers behind one port, sharing PROMETHEUS_MULTIPROC_DIR: whichever answers a
    scrape counts the requests both served (alone, each would count only its own share)."""
    port, shared_dir = free_port(), tmp_path / "prometheus-multiproc"
    shared_dir.mkdir()
    env = {**os.environ, **TEST_ENV, "CYXWIZ_REDIS_URL": valkey.gateway_url,
           "PROMETHEUS_MULTIPROC_DIR": str(shared_dir)}
    gateway = subprocess.Popen([sys.executable, "-m", "hypercorn", "functions.gateway:app", "--bind",
                                f"127.0.0.1:{port}", "--workers", "2"], env=env, cwd=REPO, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_healthy(url, 30)
        key = creds["api_key"]
        for _ in range(30):  # a new connection each: the kernel spreads them over both workers
            assert httpx.get(f"{url}/v1/jobs/j-00000000000000000000", headers=bearer(key)).status_code == 404
        with httpx.Client(base_url=url, timeout=10) as http:
            for _ in range(3):  # each scrape may be answered by either worker
                counts = series(scrape(http, key), HISTOGRAM + "_count", "function", "route", "method", "status")
                assert counts[("submit", "/v1/jobs/{job_id}", "GET", "404")] == 30
    finally:
        os.killpg(gateway.pid, signal.SIGTERM)
        gateway.wait(30)


def query_values(prometheus: httpx.Client, queries: list[str]) -> dict[str, list[str]]:
    """Each PromQL query's result values; empty while Prometheus is still starting (not listening, or
    answering 503 until it is ready)."""
    try:
        if prometheus.get("/-/ready").status_code != 200:
            return {}
        answers = {q: prometheus.get("/api/v1/query", params={"query": q}) for q in queries}
    except httpx.TransportError:
        return {}
    assert all(a.status_code == 200 for a in answers.values()), [a.text for a in answers.values()]
    return {q: [row["value"][1] for row in a.json()["data"]["result"]] for q, a in answers.items()}


def test_a_real_prometheus_scrapes_the_gateway(http: httpx.Client, creds: dict[str, str], api_url: str,
                                               tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus binary: scripts/test installs it (apt-get install prometheus) when run as root")
    key = creds["api_key"]
    jobs = [submit(http, key)["job_id"] for _ in range(3)]
    assert http.post(f"/v1/jobs/{jobs[0]}/cancel", headers=bearer(key)).status_code == 202
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "scrape_configs:\n"
        "  - job_name: cyxwiz\n"
        "    scrape_interval: 1s\n"
        "    scrape_timeout: 1s\n"
        "    authorization: {type: Bearer, credentials: " + key + "}\n"
        f"    static_configs: [{{targets: ['{api_url.removeprefix('http://')}']}}]\n")
    config.chmod(0o600)
    port = free_port()
    log_path = tmp_path / "prometheus.log"
    wanted = {"cyxwiz_jobs_submitted_total": "3", 'sum(cyxwiz_jobs{status="queued"})': "2",
              'cyxwiz_jobs_finished_total{status="cancelled"}': "1", 'up{job="cyxwiz"}': "1"}
    seen: dict[str, list[str]] = {}
    with log_path.open("wb") as log:
        server = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                   f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as prometheus:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    seen = query_values(prometheus, list(wanted))
                    if seen and all(seen[q] == [v] for q, v in wanted.items()):
                        break
                    time.sleep(0.5)
                assert seen and all(seen[q] == [v] for q, v in wanted.items()), (seen, log_path.read_text()[-2000:])
                targets = prometheus.get("/api/v1/targets").json()["data"]["activeTargets"]
                assert [(t["labels"]["job"], t["health"]) for t in targets] == [("cyxwiz", "up")], targets
        finally:
            server.terminate()
            server.wait(30)
