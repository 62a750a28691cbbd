"""When Redis is down or hung, functions answer 503 with Retry-After within seconds, and recover by
themselves when it is back; the accepted job survives a Redis restart (append-only file)."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import httpx

from cyxwiz.embedded import EmbeddedValkey
from shared import auth
from tests.conftest import DIGITS_SPEC, bearer, start_gateway


def test_redis_down_hung_and_back() -> None:
    server = EmbeddedValkey(Path(tempfile.mkdtemp(prefix="cyxwiz-outage-")))
    server.start()
    gateway, url = start_gateway(server.url)
    try:
        import redis

        admin = auth.new_token("cwk")
        client = redis.Redis.from_url(server.url)
        client.hset("cyxwiz:auth:api_keys", auth.hash_token(admin), '{"tenant": "admin", "admin": true}')
        client.close()
        with httpx.Client(base_url=url, timeout=15) as http:
            created = http.post("/v1/jobs", json=DIGITS_SPEC, headers=bearer(admin))
            assert created.status_code == 201
            job_id = created.json()["job_id"]

            server.kill()  # down: connection refused
            for request in (lambda: http.get("/healthz"), lambda: http.get(f"/v1/jobs/{job_id}", headers=bearer(admin)),
                            lambda: http.post("/v1/jobs", json=DIGITS_SPEC, headers=bearer(admin))):
                started = time.monotonic()
                resp = request()
                assert resp.status_code == 503, resp.text
                assert resp.json()["error"]["code"] == "store_unavailable" and resp.headers["retry-after"]
                assert time.monotonic() - started < 5

            server.start()  # back, same port and data dir: the job is still there
            job = http.get(f"/v1/jobs/{job_id}", headers=bearer(admin))
            assert job.status_code == 200 and job.json()["status"] == "queued"

            assert server.process is not None
            os.kill(server.process.pid, signal.SIGSTOP)  # hung: accepts nothing, answers nothing
            try:
                started = time.monotonic()
                resp = http.get(f"/v1/jobs/{job_id}", headers=bearer(admin))
                assert resp.status_code == 503 and time.monotonic() - started < 5
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            deadline = time.monotonic() + 10
            while http.get("/healthz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert http.get(f"/v1/jobs/{job_id}", headers=bearer(admin)).status_code == 200
    finally:
        gateway.terminate()
        gateway.wait()
        server.stop()


def test_downloads_after_a_redis_restart_are_whole_or_503() -> None:
    """Pooled connections go stale when Redis restarts: a download must then answer 503 (and the client
    retries), never send its headers and cut the body off."""
    from cyxwiz.server import install_credentials_at

    server = EmbeddedValkey(Path(tempfile.mkdtemp(prefix="cyxwiz-restart-")))
    server.start()
    gateway, url = start_gateway(server.url)
    admin, join = auth.new_token("cwk"), auth.new_token("cwj")
    install_credentials_at(server.url, admin, join)
    try:
        with httpx.Client(base_url=url, timeout=15) as http:
            reg = http.post("/v1/nodes", json={"name": "n"}, headers=bearer(join)).json()
            job_id = http.post("/v1/jobs", json=DIGITS_SPEC, headers=bearer(admin)).json()["job_id"]
            weights = os.urandom(1_100_000)
            put = http.put(f"/v1/jobs/{job_id}/artifacts/data.bin", content=weights,
                           headers=bearer(reg["session_token"]))
            assert put.status_code == 201
            download = f"/v1/jobs/{job_id}/artifacts/data.bin"
            for _ in range(3):  # warm the pool's connections
                assert http.get(download, headers=bearer(admin)).content == weights
            server.kill()
            server.start()
            answers = []
            for _ in range(8):
                resp = http.get(download, headers=bearer(admin))
                answers.append(resp.status_code)
                assert resp.status_code in (200, 503)
                if resp.status_code == 200:
                    assert resp.content == weights
            assert answers[-1] == 200
    finally:
        gateway.terminate()
        gateway.wait()
        server.stop()
