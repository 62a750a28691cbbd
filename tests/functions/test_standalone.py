"""Each function runs alone under Hypercorn (`hypercorn functions.<name>.app:app`), and rate limiting."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from cyxwiz.embedded import free_port
from cyxwiz.server import wait_healthy
from tests.conftest import DIGITS_SPEC, REPO, TEST_ENV, bearer, start_gateway


@pytest.mark.parametrize(("module", "method", "path", "status"), [
    ("register", "GET", "/v1/nodes", 200),
    ("heartbeat", "POST", "/v1/nodes/n-0123456789abcdef/heartbeat", 401),
    ("submit", "GET", "/v1/jobs", 200),
    ("progress", "GET", "/v1/jobs/j-0123456789abcdef0123/progress", 404),
])
def test_function_runs_alone(redis_url: str, creds: dict[str, str], module: str, method: str, path: str,
                             status: int) -> None:
    port = free_port()
    env = {**os.environ, **TEST_ENV, "CYXWIZ_REDIS_URL": redis_url}
    proc = subprocess.Popen([sys.executable, "-m", "hypercorn", f"functions.{module}.app:app", "--bind",
                             f"127.0.0.1:{port}"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}", 30)
        resp = httpx.request(method, f"http://127.0.0.1:{port}{path}", headers=bearer(creds["api_key"]))
        assert resp.status_code == status, resp.text
        # routes of the other functions are not there
        other = "/v1/jobs" if module in ("register", "heartbeat") else "/v1/nodes"
        assert httpx.get(f"http://127.0.0.1:{port}{other}", headers=bearer(creds["api_key"])).status_code in (404, 405)
    finally:
        proc.terminate()
        proc.wait(10)


def test_rate_limit_answers_429(redis_url: str, creds: dict[str, str]) -> None:
    proc, url = start_gateway(redis_url, {"CYXWIZ_RATE_LIMIT_PER_S": "5"})
    try:
        with httpx.Client(base_url=url) as http:
            codes = [http.get("/v1/jobs", headers=bearer(creds["api_key"])).status_code for _ in range(12)]
            assert codes.count(200) >= 5 and 429 in codes
            limited = next(r for r in (http.get("/v1/jobs", headers=bearer(creds["api_key"])) for _ in range(10))
                           if r.status_code == 429)
            assert limited.headers["retry-after"] == "1" and limited.json()["error"]["code"] == "rate_limited"
            assert http.post("/v1/jobs", json=DIGITS_SPEC, headers=bearer(creds["api_key"])).status_code in (201, 429)
    finally:
        proc.terminate()
        proc.wait(10)
