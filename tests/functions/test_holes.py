"""Holes a hostile review found that fit no one function's test file: forged session tokens."""

from __future__ import annotations

import httpx
import redis

from tests.conftest import bearer, keyspace, register, submit


def test_session_token_node_id_must_be_a_node_id(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    """A session token names its node; a name that is not a node id (one reaching into another key,
    ``n-...:assignments`` is a stream) is 401 everywhere, never a 500, and changes nothing."""
    reg = register(http, creds["join_token"])
    node_id = reg["node_id"]
    job_id = submit(http, creds["api_key"])["job_id"]
    secret = reg["session_token"].rsplit(".", 1)[1]
    forged_tokens = [f"cwn.{node_id}:assignments.x", f"cwn.{node_id}:assignments.{secret}",
                     f"cwn.{node_id.upper()}.{secret}", f"cwn.{node_id}0.{secret}", f"cwn.cyxwiz:nodes:score.{secret}",
                     f"cwn.{node_id}:assignments"]
    calls = [("POST", f"/v1/nodes/{node_id}/heartbeat", None),
             ("POST", f"/v1/jobs/{job_id}/progress", {"attempt": 1, "seq": 1, "status": "running"}),
             ("PUT", f"/v1/jobs/{job_id}/artifacts/model.safetensors", None),
             ("GET", f"/v1/jobs/{job_id}/attempts/1", None),
             ("GET", f"/v1/jobs/{job_id}/artifacts/model.safetensors", None),
             ("DELETE", f"/v1/nodes/{node_id}", None)]
    before = keyspace(r)
    for token in forged_tokens:
        for method, path, body in calls:
            content = b"weights" if method == "PUT" else None
            resp = http.request(method, path, json=body, content=content, headers=bearer(token))
            assert resp.status_code == 401, (token, method, path, resp.text)
            assert resp.json()["error"]["code"] == "unauthorized"
    assert keyspace(r) == before
    # the real token still works
    beat = http.post(f"/v1/nodes/{node_id}/heartbeat", headers=bearer(reg["session_token"]))
    assert beat.status_code == 200, beat.text
