"""A real HTTP proxy between node runtimes (or a job process) and the gateway, for the faults a gateway
does not make on demand: it forwards every request and records it, and a rule can answer a matching
request itself (a 503 with Retry-After) or hold it until the test lets it go."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.node_runtime.node_harness import NodeProcess

# hop-by-hop headers, and those httpx sets again for the forwarded request or answer
_NOT_FORWARDED = {"host", "connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding",
                  "accept-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class Seen:
    """One request that reached the proxy, and what it answered."""

    method: str
    path: str
    body: Any  # the JSON body, or None
    status: int = 0
    at: float = 0.0  # monotonic time the request arrived
    answered_at: float = 0.0  # monotonic time its answer was sent


Match = Callable[[Seen], bool]


@dataclass
class Hold:
    """Requests matching ``match`` wait until ``release`` is set; ``arrived`` is set once one waits."""

    match: Match
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


@dataclass
class Refuse:
    """The first ``times`` requests matching ``match`` are answered by the proxy with ``status``."""

    match: Match
    times: int = 1
    status: int = 503
    retry_after_s: float | None = None
    answered: int = 0


class ApiProxy:
    """Listens on loopback; forwards to ``target`` (the gateway's URL)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.seen: list[Seen] = []
        self.holds: list[Hold] = []
        self.refusals: list[Refuse] = []
        self._lock = threading.Lock()
        proxy = self

        class _Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as httpx's clients expect

            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                proxy._handle(self)

            do_POST = do_PUT = do_DELETE = do_GET  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def hold(self, match: Match) -> Hold:
        with self._lock:
            self.holds.append(Hold(match))
            return self.holds[-1]

    def refuse(self, match: Match, times: int = 1, status: int = 503, retry_after_s: float | None = None) -> Refuse:
        with self._lock:
            self.refusals.append(Refuse(match, times, status, retry_after_s))
            return self.refusals[-1]

    def requests(self, match: Match) -> list[Seen]:
        with self._lock:
            return [seen for seen in self.seen if match(seen)]

    def close(self) -> None:
        with self._lock:
            for hold in self.holds:
                hold.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        content = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        try:
            body = json.loads(content) if content and handler.command != "PUT" else None
        except ValueError:
            body = None
        seen = Seen(handler.command, handler.path, body, at=time.monotonic())
        with self._lock:
            self.seen.append(seen)
            holds = [hold for hold in self.holds if hold.match(seen)]
            refusal = next((r for r in self.refusals if r.answered < r.times and r.match(seen)), None)
            if refusal is not None:
                refusal.answered += 1
        for hold in holds:
            hold.arrived.set()
            hold.release.wait()
        if refusal is not None:
            headers = {"Content-Type": "application/json"}
            if refusal.retry_after_s is not None:
                headers["Retry-After"] = f"{refusal.retry_after_s:g}"
            answer = json.dumps({"error": {"code": "unavailable", "message": "refused by the test's proxy"}})
            return self._answer(handler, seen, refusal.status, headers, answer.encode())
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _NOT_FORWARDED}
        try:
            with httpx.Client(base_url=self.target, timeout=60) as client:
                response = client.request(handler.command, handler.path, content=content, headers=headers)
        except httpx.TransportError:
            return self._answer(handler, seen, 502, {}, b"")
        answer_headers = {k: v for k, v in response.headers.items() if k.lower() not in _NOT_FORWARDED}
        self._answer(handler, seen, response.status_code, answer_headers, response.content)

    def _answer(self, handler: http.server.BaseHTTPRequestHandler, seen: Seen, status: int,
                headers: dict[str, str], content: bytes) -> None:
        seen.status, seen.answered_at = status, time.monotonic()  # before the client can see the answer
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        handler.wfile.write(content)
        handler.wfile.flush()


class ProxiedNodes:
    """Node runtimes, each behind a proxy of its own to the gateway at ``api_url``; ``close`` stops the
    runtimes, then the proxies (a runtime leaving still talks to the API through its own)."""

    def __init__(self, api_url: str, join_token: str, tmp_path: Path) -> None:
        self.api_url, self.join_token, self.tmp_path = api_url, join_token, tmp_path
        self.started: list[tuple[NodeProcess, ApiProxy]] = []

    def start(self, name: str, **kwargs: Any) -> tuple[NodeProcess, ApiProxy]:
        proxy = ApiProxy(self.api_url)
        kwargs["extra_env"] = {"CYXWIZ_DATA_DIR": str(self.tmp_path / "data"), **kwargs.get("extra_env", {})}
        node = NodeProcess(proxy.url, self.join_token, self.tmp_path / f"{name}.log", name=name, **kwargs)
        self.started.append((node.start(), proxy))
        return node, proxy

    def close(self, print_logs: bool = False) -> None:
        for node, _ in self.started:
            node.stop()
        for node, proxy in self.started:
            proxy.close()
            if print_logs:
                print(f"----- {node.log_path.name} -----\n{node.log()}")
