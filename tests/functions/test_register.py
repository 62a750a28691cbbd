"""Register function: joining, listing, reading and draining nodes, and every way to get it wrong."""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from tests.conftest import CPU_CAPS, GPU_CAPS, bearer, keyspace, register, submit


def test_register_returns_session_and_stream(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    reg = register(http, creds["join_token"], "gpu-host-1", slots=2, capabilities=GPU_CAPS, labels={"region": "eu"})
    assert set(reg) >= {"node_id", "session_token", "heartbeat_interval_s", "ttl_s", "assignments"}
    assert reg["ttl_s"] == 2.0 and reg["heartbeat_interval_s"] == 0.5
    stream, group = reg["assignments"]["stream"], reg["assignments"]["group"]
    assert r.exists(stream) and r.xinfo_groups(stream)[0]["name"] == group
    seconds, micros = r.time()
    assert 0 < r.zscore("cyxwiz:nodes:deadline", reg["node_id"]) - (seconds * 1000 + micros / 1000) <= 2000
    # the token, the node key and the store password are stored only as digests
    stored = str(r.hgetall(f"cyxwiz:node:{reg['node_id']}")) + str(r.hgetall("cyxwiz:nodes:identities"))
    password = urlsplit(reg["assignments"]["redis_url"]).password
    assert reg["session_token"] not in stored and reg["node_key"] not in stored and password not in stored
    assert r.hget("cyxwiz:nodes:identities", "gpu-host-1") == hashlib.sha256(reg["node_key"].encode()).hexdigest()


def test_node_object_has_score_components_on_unit_scale(http: httpx.Client, creds: dict[str, str]) -> None:
    reg = register(http, creds["join_token"], "gpu-host-1", capabilities=GPU_CAPS)
    node = http.get(f"/v1/nodes/{reg['node_id']}", headers=bearer(creds["api_key"])).json()
    for name in ("reputation", "availability", "capability", "uptime", "score"):
        assert 0.0 <= node[name] <= 1.0, name
    assert node["reputation"] == 0.75 and node["availability"] == 1.0 and node["status"] == "online"
    expected = 0.4 * node["reputation"] + 0.3 * node["availability"] + 0.2 * node["capability"] + 0.1 * node["uptime"]
    assert node["score"] == pytest.approx(expected, abs=1e-5)
    assert node["capabilities"]["gpus"][0]["name"] == "NVIDIA H200"
    assert node["running_jobs"] == 0 and node["last_heartbeat"].endswith("Z")


def test_gpu_node_outscores_cpu_node(http: httpx.Client, creds: dict[str, str]) -> None:
    register(http, creds["join_token"], "cpu", capabilities=CPU_CAPS)
    register(http, creds["join_token"], "gpu", capabilities=GPU_CAPS)
    nodes = http.get("/v1/nodes", headers=bearer(creds["api_key"])).json()["nodes"]
    assert [n["name"] for n in nodes] == ["gpu", "cpu"]


@pytest.mark.parametrize(("headers", "status"), [({}, 401), (bearer("cwj_wrong"), 401)])
def test_register_needs_join_token(http: httpx.Client, creds: dict[str, str], r: redis.Redis,
                                   headers: dict[str, str], status: int) -> None:
    before = keyspace(r)
    resp = http.post("/v1/nodes", json={"name": "x"}, headers=headers)
    assert resp.status_code == status and resp.json()["error"]["code"] == "unauthorized"
    assert keyspace(r) == before


def test_api_key_is_not_a_join_token(http: httpx.Client, creds: dict[str, str]) -> None:
    assert http.post("/v1/nodes", json={"name": "x"}, headers=bearer(creds["api_key"])).status_code == 401


@pytest.mark.parametrize(("body", "status", "field"), [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"slots": 1}', 422, "name"),
    (b'{"name": "x", "slots": 0}', 422, "slots"),
    (b'{"name": "x", "slots": "two"}', 422, "slots"),
    (b'{"name": "x", "colour": "red"}', 422, "colour"),
    (b'{"name": "x", "labels": {"a": 1}}', 422, "labels"),
    (b'{"name": "x", "capabilities": {"gpus": [{"memory_mb": -5}]}}', 422, "capabilities.gpus.0.memory_mb"),
])
def test_bad_registration_changes_nothing(http: httpx.Client, creds: dict[str, str], r: redis.Redis,
                                          body: bytes, status: int, field: str | None) -> None:
    before = keyspace(r)
    resp = http.post("/v1/nodes", content=body, headers=bearer(creds["join_token"]))
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] and error["message"]
    assert error.get("field") == field
    assert keyspace(r) == before


def test_list_and_get_need_api_key(http: httpx.Client, creds: dict[str, str]) -> None:
    reg = register(http, creds["join_token"])
    assert http.get("/v1/nodes").status_code == 401
    assert http.get("/v1/nodes", headers=bearer(reg["session_token"])).status_code == 401
    assert http.get("/v1/nodes/n-nope", headers=bearer(creds["api_key"])).status_code == 404


def test_list_nodes_pages(http: httpx.Client, creds: dict[str, str]) -> None:
    for i in range(5):
        register(http, creds["join_token"], f"n{i}")
    first = http.get("/v1/nodes?limit=3", headers=bearer(creds["api_key"])).json()
    second = http.get(f"/v1/nodes?limit=3&cursor={first['next_cursor']}", headers=bearer(creds["api_key"])).json()
    ids = [n["node_id"] for n in first["nodes"] + second["nodes"]]
    assert len(ids) == len(set(ids)) == 5 and second["next_cursor"] is None
    assert http.get("/v1/nodes?limit=0", headers=bearer(creds["api_key"])).status_code == 422


def test_drain_idle_node_removes_it(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    reg = register(http, creds["join_token"])
    resp = http.delete(f"/v1/nodes/{reg['node_id']}", headers=bearer(reg["session_token"]))
    assert resp.status_code == 202 and resp.json()["status"] == "removed"
    assert not r.exists(f"cyxwiz:node:{reg['node_id']}") and r.zscore("cyxwiz:nodes:score", reg["node_id"]) is None


def test_draining_node_takes_no_new_jobs(http: httpx.Client, creds: dict[str, str]) -> None:
    reg = register(http, creds["join_token"], slots=2)
    first = submit(http, creds["api_key"])
    assert first["node_id"] == reg["node_id"]
    resp = http.delete(f"/v1/nodes/{reg['node_id']}", headers=bearer(creds["api_key"]))
    assert resp.status_code == 202 and resp.json()["status"] == "draining"
    assert submit(http, creds["api_key"])["status"] == "queued"
    node = http.get(f"/v1/nodes/{reg['node_id']}", headers=bearer(creds["api_key"])).json()
    assert node["status"] == "draining" and node["running_jobs"] == 1


def test_drain_permissions(http: httpx.Client, creds: dict[str, str]) -> None:
    a = register(http, creds["join_token"], "a")
    b = register(http, creds["join_token"], "b")
    assert http.delete(f"/v1/nodes/{a['node_id']}", headers=bearer(b["session_token"])).status_code == 403
    tenant_key = http.post("/v1/keys", json={"tenant": "acme"}, headers=bearer(creds["api_key"])).json()["api_key"]
    assert http.delete(f"/v1/nodes/{a['node_id']}", headers=bearer(tenant_key)).status_code == 403
    assert http.delete("/v1/nodes/n-nope", headers=bearer(creds["api_key"])).status_code == 404


def test_healthz(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}


def test_unknown_route_and_method_use_error_shape(http: httpx.Client) -> None:
    resp = http.get("/v2/nothing")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    resp = http.put("/v1/nodes")
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"


def test_body_too_large_is_413(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    before = keyspace(r)
    resp = http.post("/v1/nodes", content=b"{" + b" " * (2 << 20) + b"}", headers=bearer(creds["join_token"]))
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"
    assert keyspace(r) == before


def test_early_refusal_keeps_the_connection_usable(api_url: str, creds: dict[str, str]) -> None:
    """A request refused before its body was read (here: a bad token, the body arriving late) must not
    cost a keep-alive client its connection: the next request on it is answered."""
    import socket
    import time
    from urllib.parse import urlparse

    body = b'{"name": "late-body"}'
    head = (f"POST /v1/nodes HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer cwj_wrong\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    url = urlparse(api_url)

    def response(sock: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        headers, _, rest = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in headers.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(rest) < length:
            rest += sock.recv(65536)
        return headers

    with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
        sock.sendall(head)
        time.sleep(0.2)  # the body comes in a later segment, as under load
        sock.sendall(body)
        assert response(sock).startswith(b"HTTP/1.1 401")
        sock.sendall(head + body)
        assert response(sock).startswith(b"HTTP/1.1 401")


@pytest.mark.parametrize("query", ["cursor=9223372036854775807", "cursor=99999999999999999999999999",
                                   "cursor=-1", "cursor=1e3", "cursor=%200", "limit=9223372036854775807",
                                   "limit=-5", "limit=1001"])
def test_node_page_bounds_are_client_errors(http: httpx.Client, creds: dict[str, str], query: str) -> None:
    register(http, creds["join_token"])
    resp = http.get(f"/v1/nodes?{query}", headers=bearer(creds["api_key"]))
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == query.split("=")[0]


def test_a_cursor_past_the_end_is_an_empty_page(http: httpx.Client, creds: dict[str, str]) -> None:
    register(http, creds["join_token"])
    resp = http.get("/v1/nodes?cursor=1000000", headers=bearer(creds["api_key"]))
    assert resp.status_code == 200 and resp.json() == {"nodes": [], "next_cursor": None}


@pytest.mark.parametrize(("body", "field"), [
    ({"name": "evil\x1b[31mred"}, "name"),
    ({"name": "two\nlines"}, "name"),
    ({"name": "carriage\rreturn"}, "name"),
    ({"name": "tab\there"}, "name"),
    ({"name": "del\x7f"}, "name"),
    ({"name": "c1\x9bcontrol"}, "name"),
    ({"name": " leading"}, "name"),
    ({"name": "trailing "}, "name"),
    ({"name": "ok", "labels": {"re\x1bgion": "eu"}}, "labels"),
    ({"name": "ok", "labels": {"region": "eu\n"}}, "labels"),
    ({"name": "ok", "capabilities": {"gpus": [{"name": "H200\x1b[2J"}]}}, "capabilities.gpus.0.name"),
    ({"name": "ok", "capabilities": {"torch_version": "2.5\r"}}, "capabilities.torch_version"),
])
def test_control_characters_in_names_are_refused(http: httpx.Client, creds: dict[str, str], r: redis.Redis,
                                                 body: dict[str, object], field: str) -> None:
    before = keyspace(r)
    resp = http.post("/v1/nodes", json=body, headers=bearer(creds["join_token"]))
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == field
    assert keyspace(r) == before


def test_unicode_names_and_labels_are_fine(http: httpx.Client, creds: dict[str, str]) -> None:
    reg = register(http, creds["join_token"], "rechner-münchen 1", labels={"région": "île-de-france"})
    node = http.get(f"/v1/nodes/{reg['node_id']}", headers=bearer(creds["api_key"])).json()
    assert node["name"] == "rechner-münchen 1" and node["labels"] == {"région": "île-de-france"}


@pytest.mark.parametrize(("capabilities", "field"), [
    ({**CPU_CAPS, "blob": "x" * 300_000}, "capabilities"),
    ({**CPU_CAPS, "notes": "x" * 8200}, "capabilities"),
    ({**GPU_CAPS, "gpus": GPU_CAPS["gpus"] * 65}, "capabilities.gpus"),
    ({"gpus": [{"name": "g" * 129}]}, "capabilities.gpus.0.name"),
    ({"gpus": [{"name": "gpu", "compute_capability": "9" * 17}]}, "capabilities.gpus.0.compute_capability"),
    ({"cuda_version": "1" * 65}, "capabilities.cuda_version"),
    ({"torch_version": "2" * 65}, "capabilities.torch_version"),
    ({"device": "d" * 65}, "capabilities.device"),
])
def test_capabilities_are_capped(http: httpx.Client, creds: dict[str, str], r: redis.Redis,
                                 capabilities: dict[str, object], field: str) -> None:
    before = keyspace(r)
    resp = http.post("/v1/nodes", json={"name": "big", "capabilities": capabilities},
                     headers=bearer(creds["join_token"]))
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == field
    assert keyspace(r) == before


def test_an_eight_gpu_node_registers(http: httpx.Client, creds: dict[str, str]) -> None:
    caps = {**GPU_CAPS, "gpus": GPU_CAPS["gpus"] * 8, "cuda_version": "12.4", "torch_version": "2.5.1+cu124"}
    reg = register(http, creds["join_token"], capabilities=caps)
    node = http.get(f"/v1/nodes/{reg['node_id']}", headers=bearer(creds["api_key"])).json()
    assert len(node["capabilities"]["gpus"]) == 8
