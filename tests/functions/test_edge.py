"""The HTTP edge (shared/edge.py): body and request deadlines, in-flight caps, bounded drains, and the
JSON media-type check, against a real gateway where the behaviour is on the wire, and in process
(a tiny ASGI app behind the middleware) where only a controlled clock makes it deterministic.

No timing is asserted tightly: bounds are several times the configured deadlines.
"""

from __future__ import annotations

import asyncio
import select
import socket
import subprocess
import time
from collections.abc import Iterator, MutableMapping
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import redis

from cyxwiz.embedded import EmbeddedValkey
from shared.edge import DRAIN_LIMIT_BYTES, Deadline, EdgeLimits, InFlight, request_deadline
from shared.settings import Settings
from tests.conftest import DIGITS_SPEC, bearer, keyspace, register, start_gateway

ATTACKER = "127.0.0.2"  # Linux routes all of 127/8 to lo: another client address on this host


@pytest.fixture()
def edge_gateway(valkey: EmbeddedValkey) -> Iterator[str]:
    """A gateway of this test's own with short body deadlines and a small per-address cap."""
    proc, url = start_gateway(valkey.gateway_url, {
        "CYXWIZ_BODY_TIMEOUT_S": "1", "CYXWIZ_MIN_BODY_RATE_BPS": "1000", "CYXWIZ_MAX_REQUESTS_PER_CLIENT": "20"})
    yield url
    _stop(proc)


@pytest.fixture()
def holding_gateway(valkey: EmbeddedValkey) -> Iterator[str]:
    """A gateway whose body deadline outlasts the test: admitted slow bodies stay in flight."""
    proc, url = start_gateway(valkey.gateway_url, {
        "CYXWIZ_BODY_TIMEOUT_S": "60", "CYXWIZ_MAX_REQUESTS_PER_CLIENT": "20"})
    yield url
    _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def slow_post(url: str, path: str, token: str, *, length: int = 1_000_000, source: str | None = None) -> socket.socket:
    """A connection that sent a POST's headers and one byte of its declared body."""
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30,
                                    source_address=(source, 0) if source else None)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{".encode())
    return sock


def drip_until_answered(sock: socket.socket, limit_s: float, every_s: float = 0.3) -> tuple[bytes, bool]:
    """Send one byte each ``every_s`` while nothing comes back; return what came back (the whole
    answer) and whether the server then closed the connection, within ``limit_s``."""
    data, deadline = b"", time.monotonic() + limit_s
    sock.settimeout(every_s)
    while time.monotonic() < deadline:
        try:
            piece = sock.recv(65536)
        except TimeoutError:
            if not data:
                try:
                    sock.sendall(b" ")
                except OSError:  # closed under us: what was answered is read below
                    pass
            continue
        except ConnectionResetError:
            return data, True
        if not piece:
            return data, True
        data += piece
    return data, False


def read_to_close(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    sock.settimeout(10)
    while True:
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not piece:
            return data
        data += piece


def parse(answer: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, orjson.loads(body) if body else None


# --- on the wire ---------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["api_key", "nobody"])
def test_dripped_body_gets_408_and_the_connection_closes(edge_gateway: str, creds: dict[str, str],
                                                         who: str) -> None:
    """A body dripped a byte at a time (1 s + size/1000 B/s allowed here) is cut off: 408 when its
    handler was reading it; a request refused before its body (no token) is answered and closed too."""
    sock = slow_post(edge_gateway, "/v1/jobs", creds["api_key"] if who == "api_key" else "cwk_wrong")
    with sock:
        answer, closed = drip_until_answered(sock, limit_s=20)
    status, headers, body = parse(answer)
    assert closed and headers["connection"] == "close"
    if who == "api_key":
        assert status == 408 and body["error"]["code"] == "request_timeout"
    else:
        assert status == 401 and body["error"]["code"] == "unauthorized"


def test_flood_from_one_address_is_capped_and_a_node_keeps_beating(
        holding_gateway: str, creds: dict[str, str], r: redis.Redis) -> None:
    """60 slow bodies from one address (cap 20): 20 are held, 40 get 503 overloaded at once with
    Retry-After and a closed connection; a node on another address registers, heartbeats (200 each
    time) and is still registered afterwards, while the 20 are still held."""
    attackers = [slow_post(holding_gateway, "/v1/nodes", creds["join_token"], source=ATTACKER) for _ in range(60)]
    try:
        answers: dict[socket.socket, bytes] = {}
        deadline = time.monotonic() + 20
        while len(answers) < 40 and time.monotonic() < deadline:
            ready, _, _ = select.select([s for s in attackers if s not in answers], [], [], 0.5)
            answers |= {sock: read_to_close(sock) for sock in ready}
        held = [sock for sock in attackers if sock not in answers]
        assert not select.select(held, [], [], 1.0)[0]  # no 41st answer comes later
        assert len(held) == 20 and len(answers) == 40
        for answer in answers.values():
            status, headers, body = parse(answer)
            assert status == 503 and body["error"]["code"] == "overloaded"
            assert int(headers["retry-after"]) > 0 and headers["connection"] == "close"

        with httpx.Client(base_url=holding_gateway, timeout=10) as http:
            reg = register(http, creds["join_token"])
            for _ in range(10):
                beat = http.post(f"/v1/nodes/{reg['node_id']}/heartbeat", headers=bearer(reg["session_token"]))
                assert beat.status_code == 200, beat.text
                time.sleep(0.3)
            node = http.get(f"/v1/nodes/{reg['node_id']}", headers=bearer(creds["api_key"]))
            assert node.status_code == 200 and node.json()["status"] == "online"
        assert not select.select(held, [], [], 0)[0]  # the flood was still in flight all along
    finally:
        for sock in attackers:
            sock.close()


def test_a_refusal_with_its_body_unread_still_closes_the_connection(edge_gateway: str) -> None:
    """A body too large to drain (40 MiB declared), sent fast after a bad token: the server answers
    without reading it and then closes the connection; it must not wait on the unread body for ever
    (Hypercorn did, holding the socket even after its client left)."""
    parts = urlsplit(edge_gateway)
    assert parts.hostname and parts.port
    for _ in range(3):
        with socket.create_connection((parts.hostname, parts.port), timeout=15) as sock:
            sock.sendall(f"POST /v1/nodes HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer cwj_wrong\r\n"
                         f"Content-Length: {40 << 20}\r\n\r\n".encode())
            sock.setblocking(False)
            sent, until = 0, time.monotonic() + 5
            while sent < (4 << 20) and time.monotonic() < until:
                try:
                    sent += sock.send(b"x" * 65536)
                except BlockingIOError:
                    time.sleep(0.01)
                except OSError:
                    break
            sock.setblocking(True)
            _, closed = drip_until_answered(sock, limit_s=15, every_s=1.0)
            assert closed


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/nodes"])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_non_json_media_types_are_415_and_change_nothing(http: httpx.Client, creds: dict[str, str],
                                                         r: redis.Redis, path: str, content_type: str) -> None:
    token = creds["api_key"] if path == "/v1/jobs" else creds["join_token"]
    body = orjson.dumps(DIGITS_SPEC if path == "/v1/jobs" else
                        {"name": "n-415", "slots": 1, "capabilities": {"device": "cpu", "cpu_cores": 1, "ram_mb": 64}})
    before = keyspace(r)
    resp = http.post(path, content=body, headers={**bearer(token), "Content-Type": content_type})
    assert resp.status_code == 415 and resp.json()["error"]["code"] == "unsupported_media_type"
    assert keyspace(r) == before
    assert http.get("/healthz").status_code == 200  # the same keep-alive connection still answers


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/vnd.cyxwiz+json", None])
def test_json_media_types_and_none_are_accepted(http: httpx.Client, creds: dict[str, str],
                                                content_type: str | None) -> None:
    headers = bearer(creds["api_key"]) | ({"Content-Type": content_type} if content_type else {})
    resp = http.post("/v1/jobs", content=orjson.dumps(DIGITS_SPEC), headers=headers)
    assert resp.status_code == 201, resp.text


def test_oversized_body_with_content_length_is_seen_as_413_every_time(api_url: str, creds: dict[str, str],
                                                                      r: redis.Redis) -> None:
    """10 MB to POST /v1/jobs (limit 1 MiB): a client that sends its whole body before reading (httpx)
    gets the 413, 8 times of 8; so does an unauthenticated one its 401."""
    before = keyspace(r)
    payload = b"x" * 10_000_000
    with httpx.Client(base_url=api_url, timeout=30) as client:
        for _ in range(8):
            resp = client.post("/v1/jobs", content=payload,
                               headers={**bearer(creds["api_key"]), "Content-Type": "application/json"})
            assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"
            assert resp.headers["connection"] == "close"
        for _ in range(2):
            resp = client.post("/v1/nodes", content=payload, headers=bearer("cwj_wrong"))
            assert resp.status_code == 401
    assert keyspace(r) == before


# --- in process: the middleware around a tiny app ------------------------------------------------


class Wire:
    """What a server would hand the middleware: body pieces (each after a delay), and what came back."""

    def __init__(self, pieces: list[tuple[float, bytes]] | None = None, *, declared: int | None = None) -> None:
        self.pieces = list(pieces or [])
        self.declared = declared
        self.sent: list[MutableMapping[str, Any]] = []
        self.received: list[str] = []  # in order: "body" per piece handed over, then sends as "start"/"body"

    def scope(self, method: str = "POST", path: str = "/v1/jobs", client: str = "10.0.0.1") -> dict[str, Any]:
        headers = []
        if self.declared is not None:
            headers.append((b"content-length", str(self.declared).encode()))
        return {"type": "http", "method": method, "path": path, "headers": headers, "client": (client, 5000)}

    async def receive(self) -> dict[str, Any]:
        if not self.pieces:
            await asyncio.sleep(3600)  # a client that has nothing more to say
        delay, data = self.pieces.pop(0)
        await asyncio.sleep(delay)
        self.received.append("body")
        return {"type": "http.request", "body": data, "more_body": bool(self.pieces)}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        self.sent.append(message)
        self.received.append(message["type"].rsplit(".", 1)[1])

    def status(self) -> int:
        return int(self.sent[0]["status"])

    def headers(self) -> dict[bytes, bytes]:
        return dict(self.sent[0]["headers"])

    def error(self) -> Any:
        return orjson.loads(b"".join(m.get("body", b"") for m in self.sent[1:]))["error"]


def edge_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"body_timeout_s": 0.2, "min_body_rate_bps": 1000, "request_timeout_s": 0.3,
                            "max_requests_per_client": 2, "max_requests": 16}
    return Settings(**(base | overrides))


async def respond(send: Any, status: int = 200, body: bytes = b"{}", more: bool = False) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body, "more_body": more})


async def test_a_hanging_handler_is_cancelled_with_503_request_timeout() -> None:
    cancelled = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.set()

    wire = Wire()
    await asyncio.wait_for(EdgeLimits(app, edge_settings())(wire.scope(), wire.receive, wire.send), 30)
    assert cancelled.is_set()
    assert wire.status() == 503 and wire.error()["code"] == "request_timeout"
    assert wire.headers()[b"connection"] == b"close" and int(wire.headers()[b"retry-after"]) > 0


async def test_streams_and_uploads_outlive_the_request_deadline() -> None:
    """An event stream is bounded only until its response starts; an upload not at all (its body
    deadline bounds it)."""
    async def stream(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(4):
            await asyncio.sleep(0.3)  # 1.2 s in all: four request deadlines
            await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    for path in ("/v1/jobs/j-0123456789abcdef0123/events", "/v1/jobs/j-0123456789abcdef0123/logs"):
        wire = Wire()  # an event stream, a followed log
        edge = EdgeLimits(stream, edge_settings())
        await asyncio.wait_for(edge(wire.scope("GET", path), wire.receive, wire.send), 30)
        assert wire.status() == 200 and len(wire.sent) == 6

    async def slow_commit(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await asyncio.sleep(1.0)  # storing it takes three request deadlines
        await respond(send, 201)

    upload = Wire([(0.0, b"a" * 500), (0.0, b"b" * 500)], declared=1000)
    await asyncio.wait_for(EdgeLimits(slow_commit, edge_settings())(
        upload.scope("PUT", "/v1/jobs/j-0123456789abcdef0123/artifacts/model.safetensors"),
        upload.receive, upload.send), 30)
    assert upload.status() == 201


def test_which_requests_the_deadline_covers() -> None:
    job = "/v1/jobs/j-0123456789abcdef0123"
    assert request_deadline("POST", "/v1/jobs") is Deadline.WHOLE
    assert request_deadline("POST", f"{job}/progress") is Deadline.WHOLE
    assert request_deadline("GET", f"{job}/events") is Deadline.UNTIL_RESPONSE
    assert request_deadline("GET", f"{job}/logs") is Deadline.UNTIL_RESPONSE  # ?follow=1 streams (no query here)
    assert request_deadline("POST", f"{job}/logs") is Deadline.WHOLE  # a node's batch of lines
    assert request_deadline("GET", f"{job}/artifacts/model.safetensors") is Deadline.UNTIL_RESPONSE
    assert request_deadline("PUT", f"{job}/artifacts/model.safetensors") is Deadline.NONE


async def test_a_dripped_body_makes_the_handler_see_a_disconnect_and_the_client_a_408() -> None:
    seen: list[str] = []

    async def reader(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            seen.append(message["type"])
            if message["type"] == "http.disconnect":
                return  # gives up without answering: the edge answers
            if not message.get("more_body"):
                break

    # 0.2 s + a few bytes / 1000 B/s allowed; each byte comes 0.1 s after the last
    wire = Wire([(0.1, b"x")] * 50, declared=50)
    await asyncio.wait_for(EdgeLimits(reader, edge_settings(request_timeout_s=60))(
        wire.scope(), wire.receive, wire.send), 30)
    assert seen[-1] == "http.disconnect" and 1 <= seen.count("http.request") < 10
    assert wire.status() == 408 and wire.error()["code"] == "request_timeout"
    assert wire.headers()[b"connection"] == b"close"


async def test_a_large_body_at_the_minimum_rate_passes() -> None:
    """Pieces of 1000 bytes every 0.15 s (6,700 B/s): each arrives before 0.2 s + bytes so far / 1000
    B/s, though the whole body takes several body timeouts."""
    async def reader(scope: Any, receive: Any, send: Any) -> None:
        size = 0
        while True:
            message = await receive()
            assert message["type"] == "http.request"
            size += len(message["body"])
            if not message.get("more_body"):
                break
        await respond(send, 201, orjson.dumps({"size": size}))

    wire = Wire([(0.15, b"y" * 1000)] * 8, declared=8000)
    await asyncio.wait_for(EdgeLimits(reader, edge_settings(request_timeout_s=60))(
        wire.scope(), wire.receive, wire.send), 30)
    assert wire.status() == 201 and orjson.loads(wire.sent[1]["body"]) == {"size": 8000}


async def test_an_early_answer_waits_until_the_body_was_drained() -> None:
    async def refuse(scope: Any, receive: Any, send: Any) -> None:
        await respond(send, 401, b'{"error": {"code": "unauthorized", "message": "no"}}')

    small = Wire([(0.0, b"z" * 100)] * 3, declared=300)
    await EdgeLimits(refuse, edge_settings())(small.scope(), small.receive, small.send)
    assert small.received == ["body", "body", "body", "start", "body"]
    assert b"connection" not in small.headers()  # all of it read: the connection can be kept

    big = Wire([(0.0, b"z" * 400_000)] * 5, declared=2_000_000)  # over max_body_bytes (1 MiB)
    await EdgeLimits(refuse, edge_settings())(big.scope(), big.receive, big.send)
    assert big.received[:5] == ["body"] * 5 and big.headers()[b"connection"] == b"close"

    huge = Wire([(0.0, b"z")], declared=DRAIN_LIMIT_BYTES + 1)  # not worth reading
    await EdgeLimits(refuse, edge_settings())(huge.scope(), huge.receive, huge.send)
    assert huge.received == ["start", "body"] and huge.headers()[b"connection"] == b"close"


async def test_past_the_per_address_cap_the_answer_is_503_without_reading() -> None:
    release = asyncio.Event()

    async def hold(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        await respond(send)

    edge = EdgeLimits(hold, edge_settings(request_timeout_s=60))
    wires = [Wire([(0.0, b"{}")], declared=2) for _ in range(3)]
    tasks = [asyncio.create_task(edge(w.scope(), w.receive, w.send)) for w in wires[:2]]
    await asyncio.sleep(0.05)
    await edge(wires[2].scope(), wires[2].receive, wires[2].send)
    assert wires[2].status() == 503 and wires[2].error()["code"] == "overloaded"
    assert wires[2].received == ["start", "body"]  # its body was never read
    assert wires[2].headers()[b"connection"] == b"close" and wires[2].headers()[b"retry-after"]
    other = Wire()
    release.set()
    await asyncio.gather(*tasks)
    await edge(other.scope(client="10.0.0.9"), other.receive, other.send)
    assert [w.status() for w in wires[:2]] == [200, 200] and other.status() == 200
    assert edge.in_flight.total == 0 and edge.in_flight.by_client == {}


def test_the_last_eighth_of_the_total_is_kept_for_addresses_with_nothing_in_flight() -> None:
    caps = InFlight(per_client=100, total=16)
    assert all(caps.admit(f"a{i % 2}") for i in range(14))  # two busy addresses fill 14 of 16
    assert not caps.admit("a0") and not caps.admit("a1")      # the reserve is not theirs
    assert caps.admit("node") and caps.admit("other")         # a lone request still gets in
    assert not caps.admit("third")                             # the total is the total
    caps.release("node")
    assert caps.admit("third") and caps.total == 16
