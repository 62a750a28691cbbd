"""Nodes are strangers: the store requires credentials, a node's own store user can read and
acknowledge its own assignment stream and nothing else, and a node name belongs to its node key."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from cyxwiz.embedded import EmbeddedValkey
from tests.conftest import bearer, keyspace, register, submit


def node_client(reg: dict[str, object]) -> redis.Redis:
    assignments = reg["assignments"]
    assert isinstance(assignments, dict)
    return redis.Redis.from_url(assignments["redis_url"], decode_responses=True)


def wait_for(check, timeout_s: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_a_node_reads_and_acknowledges_its_own_stream_and_nothing_else(
        http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    victim = register(http, creds["join_token"], "victim")
    job_id = submit(http, creds["api_key"])["job_id"]
    attacker = register(http, creds["join_token"], "attacker")
    stream, group = attacker["assignments"]["stream"], attacker["assignments"]["group"]
    assert urlsplit(attacker["assignments"]["redis_url"]).username == f"node-{attacker['node_id']}"
    node = node_client(attacker)
    assert node.ping() is True
    assert node.xreadgroup(group, attacker["node_id"], {stream: ">"}) == []  # its own stream: fine
    r.xadd(stream, {"job_id": "j-x", "attempt": 1, "spec": "{}"})
    [[_, [(entry_id, _)]]] = node.xreadgroup(group, attacker["node_id"], {stream: ">"})
    assert node.xack(stream, group, entry_id) == 1 and node.xdel(stream, entry_id) == 1

    before = keyspace(r)
    attempts = [
        ("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("SCAN", "0"), ("INFO",), ("ACL", "LIST"),
        ("HSET", "cyxwiz:auth:api_keys", "digest", '{"tenant": "admin", "admin": true}'),
        ("HGETALL", f"cyxwiz:job:{job_id}"), ("HGET", "cyxwiz:reputation", "victim"),
        ("XREADGROUP", "GROUP", group, "me", "STREAMS", victim["assignments"]["stream"], "0"),
        ("XACK", victim["assignments"]["stream"], group, "0-1"), ("XDEL", victim["assignments"]["stream"], "0-1"),
        ("XADD", stream, "*", "job_id", job_id), ("XRANGE", stream, "-", "+"), ("DEL", stream),
        ("EVAL", "return redis.call('FLUSHALL')", "0"), ("SUBSCRIBE", "x"),
    ]
    for command in attempts:
        with pytest.raises(redis.exceptions.NoPermissionError):
            node.execute_command(*command)
        assert keyspace(r) == before, command
    node.close()


def test_the_store_refuses_connections_without_credentials(valkey: EmbeddedValkey, r: redis.Redis) -> None:
    before = keyspace(r)
    with socket.create_connection(("127.0.0.1", valkey.port), timeout=5) as raw:
        raw.sendall(b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nKEYS\r\n$1\r\n*\r\n")
        answer = b""
        while answer.count(b"\r\n") < 2:
            answer += raw.recv(4096)
    assert answer.startswith(b"-NOAUTH") and answer.split(b"\r\n")[1].startswith(b"-NOAUTH")
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=valkey.port, username="default", password="").ping()
    assert keyspace(r) == before


def test_the_gateway_user_cannot_flush_or_reconfigure_the_store(valkey: EmbeddedValkey) -> None:
    gateway = redis.Redis.from_url(valkey.gateway_url)
    for command in (("FLUSHALL",), ("CONFIG", "SET", "appendonly", "no"), ("KEYS", "*"), ("SHUTDOWN",),
                    ("SET", "not-cyxwiz", "1")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            gateway.execute_command(*command)
    gateway.close()


def test_an_impostor_cannot_take_a_name_and_its_reputation(
        http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    honest = register(http, creds["join_token"], "gpu-host-1")
    assert honest["node_key"].startswith("cwi_")
    r.hset("cyxwiz:reputation", "gpu-host-1", "0.9")
    before = keyspace(r)
    users = sorted(r.acl_users())
    body = {"name": "gpu-host-1", "slots": 1}
    for guess in (None, "cwi_" + "A" * 43, honest["session_token"]):
        resp = http.post("/v1/nodes", json={**body, **({"node_key": guess} if guess else {})},
                         headers=bearer(creds["join_token"]))
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "name_taken", resp.text
        assert keyspace(r) == before and sorted(r.acl_users()) == users  # its store user went again
    # the holder of the key: refused while its registration is live, welcome once that one is gone
    again = http.post("/v1/nodes", json={**body, "node_key": honest["node_key"]}, headers=bearer(creds["join_token"]))
    assert again.status_code == 409 and again.json()["error"]["code"] == "name_in_use"
    assert http.delete(f"/v1/nodes/{honest['node_id']}", headers=bearer(honest["session_token"])).status_code == 202
    assert wait_for(lambda: f"node-{honest['node_id']}" not in r.acl_users())  # its store user goes with it
    back = http.post("/v1/nodes", json={**body, "node_key": honest["node_key"]}, headers=bearer(creds["join_token"]))
    assert back.status_code == 201 and "node_key" not in back.json()
    node = http.get(f"/v1/nodes/{back.json()['node_id']}", headers=bearer(creds["api_key"])).json()
    assert node["reputation"] == 0.9  # reputation follows the identity


def test_a_reaped_node_loses_its_store_user(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    reg = register(http, creds["join_token"])
    client = node_client(reg)
    assert client.ping()
    # no heartbeat and no other traffic: the gateway's reaper timer finds it after its 2 s TTL
    assert wait_for(lambda: not r.exists(f"cyxwiz:node:{reg['node_id']}"), 10)
    assert wait_for(lambda: f"node-{reg['node_id']}" not in r.acl_users(), 5)
    client.close()
    with pytest.raises(redis.exceptions.AuthenticationError):
        node_client(reg).ping()
