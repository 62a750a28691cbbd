"""Hostile ``dataset.url``s: internal addresses, redirects, slow servers, bombs and data in error messages.

Real HTTP servers on loopback: 127.0.0.2 plays an address the operator allows (``--allow-dataset-net``),
127.0.0.1 an internal service that must stay out of reach.
"""

from __future__ import annotations

import http.server
import io
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from node_runtime.training import JobError
from node_runtime.training.user_data import MAX_REDIRECTS, DatasetLimits, parse_arrays, read_dataset_bytes
from tests.conftest import DIGITS_SPEC
from tests.node_runtime.node_harness import Api, NodeProcess

pytestmark = pytest.mark.timeout(60)

ALLOWED, INTERNAL = "127.0.0.2", "127.0.0.1"
ALLOW = ("127.0.0.2/32",)
Handler = http.server.BaseHTTPRequestHandler
Respond = Callable[[Handler], None]


class Server:
    """One real HTTP server in a thread; ``respond(handler)`` answers every GET; ``paths`` are the requests seen."""

    def __init__(self, host: str, respond: Respond, stopping: threading.Event) -> None:
        self.paths: list[str] = []
        server = self

        class _Handler(Handler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                server.paths.append(self.path)
                respond(self)

            def log_message(self, *args: object) -> None:
                pass

        self.stopping = stopping
        self.http = http.server.ThreadingHTTPServer((host, 0), _Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://{host}:{self.http.server_address[1]}"

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.thread.join()


@pytest.fixture()
def serve() -> Iterator[Callable[[str, Respond], Server]]:
    """``serve(host, respond)``: a server for this test, stopped (and its slow answers ended) afterwards."""
    stopping, servers = threading.Event(), []

    def start(host: str, respond: Respond) -> Server:
        servers.append(Server(host, respond, stopping))
        return servers[-1]

    yield start
    stopping.set()
    for server in servers:
        server.close()


def body(data: bytes, content_type: str = "application/octet-stream") -> Respond:
    def respond(handler: Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    return respond


def redirect(location: Callable[[str], str]) -> Respond:
    def respond(handler: Handler) -> None:
        handler.send_response(302)
        handler.send_header("Location", location(handler.path))
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return respond


def fetch(url: str, **limits: Any) -> bytes:
    return read_dataset_bytes(url, None, True, DatasetLimits(**limits))


def npz_bytes(compressed: bool = False, **arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    if compressed:
        np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    else:
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


SECRET_CSV = b"a,b\n1,2\n3,sk-internal-secret\n"


# --- which addresses a download may reach ---------------------------------------------------------------------

def test_loopback_is_refused_before_connecting(serve: Callable[[str, Respond], Server]) -> None:
    internal = serve(INTERNAL, body(SECRET_CSV))
    with pytest.raises(JobError, match="127.0.0.1.* a loopback address") as refused:
        fetch(internal.url + "/data.csv")
    assert internal.paths == []  # never connected
    assert "secret" not in str(refused.value)


@pytest.mark.parametrize(("url", "allow", "kind"), [
    ("http://169.254.169.254/latest/meta-data/iam/", (), "a cloud metadata"),
    ("http://169.254.169.254/latest/", ("169.254.0.0/16",), "a cloud metadata"),  # never, even when allowed
    ("http://[fd00:ec2::254]/latest/", ("::/0",), "a cloud metadata"),
    ("http://169.254.10.1/", (), "a link-local"),
    ("http://10.1.2.3/data.csv", (), "a private"),
    ("http://172.16.0.1:8080/data.csv", (), "a private"),
    ("http://192.168.1.1/data.csv", (), "a private"),
    ("http://100.64.0.1/data.csv", (), "a non-public"),
    ("http://0.0.0.0:9/data.csv", (), "an unspecified"),
    ("http://224.0.0.1/data.csv", (), "a multicast"),
    ("http://[::1]:9/data.csv", (), "a loopback"),
    ("http://[fe80::1]/data.csv", (), "a link-local"),
    ("http://[fd12:3456::1]/data.csv", (), "a private"),
    ("http://[::ffff:127.0.0.1]:9/data.csv", (), "a loopback"),  # IPv4 in IPv6 clothing
    ("http://[64:ff9b::a01:203]/data.csv", (), "a private"),  # NAT64 of 10.1.2.3
    ("http://2130706433:9/data.csv", (), "a loopback"),  # 127.0.0.1 spelt as one number
])
def test_internal_address_literals_are_refused(url: str, allow: tuple[str, ...], kind: str) -> None:
    with pytest.raises(JobError, match=f"resolves to {kind} address"):
        fetch(url, allow_nets=allow)


def test_a_host_name_is_judged_by_what_it_resolves_to() -> None:
    with pytest.raises(JobError, match="'localhost' resolves to a loopback address"):
        fetch("http://localhost:9/data.csv")


def test_an_allowed_network_is_reached_and_its_bytes_returned(serve: Callable[[str, Respond], Server]) -> None:
    data = npz_bytes(x=np.arange(12.0).reshape(6, 2), y=np.arange(6) % 2)
    allowed = serve(ALLOWED, body(data))
    with pytest.raises(JobError, match="a loopback address"):
        fetch(allowed.url + "/data.npz")  # 127.0.0.2 is loopback too, until the operator allows it
    assert fetch(allowed.url + "/data.npz?v=1", allow_nets=ALLOW) == data
    assert allowed.paths == ["/data.npz?v=1"]
    x, y, integer = parse_arrays(data, "npz")
    assert x.shape == (6, 2) and integer


def test_urls_with_credentials_are_refused() -> None:
    with pytest.raises(JobError, match="user name or password"):
        fetch(f"http://user:pw@{ALLOWED}:9/data.csv", allow_nets=ALLOW)


def test_https_is_verified_and_a_failure_quotes_nothing(serve: Callable[[str, Respond], Server]) -> None:
    plain = serve(ALLOWED, body(SECRET_CSV))  # speaks http: the handshake fails, its 400 page is not echoed
    with pytest.raises(JobError, match="TLS failed") as failed:
        fetch(plain.url.replace("http://", "https://") + "/data.csv", allow_nets=ALLOW)
    assert "400" not in str(failed.value) and "secret" not in str(failed.value)


# --- redirects --------------------------------------------------------------------------------------------------

def test_redirects_are_followed_within_allowed_addresses(serve: Callable[[str, Respond], Server]) -> None:
    target = serve(ALLOWED, body(b"1,2\n3,4\n"))
    hop = serve(ALLOWED, redirect(lambda path: target.url + "/final.csv"))
    assert fetch(hop.url + "/start.csv", allow_nets=ALLOW) == b"1,2\n3,4\n"
    assert target.paths == ["/final.csv"]


def test_a_redirect_to_an_internal_address_is_refused(serve: Callable[[str, Respond], Server]) -> None:
    internal = serve(INTERNAL, body(SECRET_CSV))
    hop = serve(ALLOWED, redirect(lambda path: internal.url + "/admin/secrets.csv"))
    with pytest.raises(JobError, match=r"'127.0.0.1' \(reached after redirects\) resolves to a loopback") as refused:
        fetch(hop.url + "/data.csv", allow_nets=ALLOW)
    assert internal.paths == [] and "secret" not in str(refused.value)


@pytest.mark.parametrize("location", ["file:///etc/passwd", "gopher://127.0.0.2/x", "ftp://example.com/x"])
def test_a_redirect_to_another_scheme_is_refused(serve: Callable[[str, Respond], Server], location: str) -> None:
    hop = serve(ALLOWED, redirect(lambda path: location))
    with pytest.raises(JobError, match="redirects to a url that is not http"):
        fetch(hop.url + "/data.csv", allow_nets=ALLOW)


def test_too_many_redirects(serve: Callable[[str, Respond], Server]) -> None:
    loop = serve(ALLOWED, redirect(lambda path: f"/hop{int(path.removeprefix('/hop') or 0) + 1}"))
    with pytest.raises(JobError, match=f"redirects more than {MAX_REDIRECTS} times"):
        fetch(loop.url + "/hop0", allow_nets=ALLOW)
    assert len(loop.paths) == MAX_REDIRECTS + 1


# --- time and rate ----------------------------------------------------------------------------------------------

def drip(stopping: threading.Event, interval_s: float, headers_too: bool) -> Respond:
    """Answer one byte every ``interval_s``: the status line and headers too, or only the body."""
    def respond(handler: Handler) -> None:
        head = b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n"
        try:
            if not headers_too:
                handler.wfile.write(head)
                handler.wfile.flush()
            stream = (head if headers_too else b"") + b"1" * 100000
            for index in range(len(stream)):
                if stopping.wait(interval_s):
                    return
                handler.wfile.write(stream[index:index + 1])
                handler.wfile.flush()
        except OSError:  # the client hung up: what the test wanted
            pass
    return respond


@pytest.mark.parametrize("headers_too", [False, True])
def test_a_dripping_server_breaks_the_minimum_rate(serve: Callable[[str, Respond], Server], headers_too: bool) -> None:
    slow = serve(ALLOWED, lambda handler: drip(slow.stopping, 0.5, headers_too)(handler))
    started = time.monotonic()
    with pytest.raises(JobError, match="slower than the node's minimum of 16384 bytes/s"):
        fetch(slow.url + "/data.csv", allow_nets=ALLOW, timeout_s=4.0)  # grace: a quarter of the timeout
    assert time.monotonic() - started < 20  # seconds, not the half hour a 60 s read timeout allowed


def test_a_download_that_keeps_the_rate_still_meets_the_deadline(serve: Callable[[str, Respond], Server]) -> None:
    slow = serve(ALLOWED, lambda handler: drip(slow.stopping, 0.05, False)(handler))  # 20 bytes/s, 100 kB
    with pytest.raises(JobError, match="took longer than the node's limit of 2 s"):
        fetch(slow.url + "/data.csv", allow_nets=ALLOW, timeout_s=2.0, min_rate_bps=1.0)


# --- sizes ------------------------------------------------------------------------------------------------------

def test_a_declared_length_over_the_cap_is_refused_up_front(serve: Callable[[str, Respond], Server]) -> None:
    def huge(handler: Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(100 << 20))
        handler.end_headers()
        handler.wfile.write(b"0,1\n" * 4)
    server = serve(ALLOWED, huge)
    with pytest.raises(JobError, match="larger than 1 MiB"):
        fetch(server.url + "/data.csv", allow_nets=ALLOW, max_mb=1)


def test_an_undeclared_length_is_capped_while_reading(serve: Callable[[str, Respond], Server]) -> None:
    def endless(handler: Handler) -> None:  # HTTP/1.0 without Content-Length: the body ends when the server hangs up
        handler.send_response(200)
        handler.end_headers()
        try:
            for _ in range(3 * 16):
                handler.wfile.write(b"0" * (64 << 10))
        except OSError:
            pass
    server = serve(ALLOWED, endless)
    with pytest.raises(JobError, match="larger than 1 MiB"):
        fetch(server.url + "/data.csv", allow_nets=ALLOW, max_mb=1)


def test_a_body_cut_short_is_an_error(serve: Callable[[str, Respond], Server]) -> None:
    def short(handler: Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        handler.wfile.write(b"0,1\n")
    server = serve(ALLOWED, short)
    with pytest.raises(JobError, match=r"cut short \(4 of 1000 bytes\)"):
        fetch(server.url + "/data.csv", allow_nets=ALLOW)


def test_a_local_file_over_the_cap_is_refused(tmp_path: Path) -> None:
    (tmp_path / "big.csv").write_bytes(b"0,1\n" * (300 << 10))  # 1.2 MiB
    with pytest.raises(JobError, match="larger than 1 MiB"):
        read_dataset_bytes("big.csv", tmp_path, False, DatasetLimits(max_mb=1))
    assert len(read_dataset_bytes("big.csv", tmp_path, False, DatasetLimits(max_mb=2))) == 1200 << 10


def gzip_bytes(data: bytes, repeat: int = 1) -> bytes:
    packer = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    return b"".join(packer.compress(data) for _ in range(repeat)) + packer.flush()


def test_a_gzip_bomb_stops_at_the_cap() -> None:
    bomb = gzip_bytes(b"0,1\n" * (256 << 10), repeat=100)  # 100 MiB of csv in about 100 kB
    assert len(bomb) < 1 << 20
    with pytest.raises(JobError, match="decompresses to more than 16 MiB"):
        parse_arrays(bomb, "csv", max_bytes=16 << 20)


def test_gzip_members_and_truncation() -> None:
    two_members = gzip_bytes(b"a,b\n1,0\n") + gzip_bytes(b"2,1\n3,0\n")
    x, y, integer = parse_arrays(two_members, "csv")
    assert x.tolist() == [[1.0], [2.0], [3.0]] and y.tolist() == [0, 1, 0] and integer
    with pytest.raises(JobError, match="truncated"):
        parse_arrays(gzip_bytes(b"1,0\n" * 1000)[:40], "csv")


def test_an_npz_bomb_is_refused_before_loading() -> None:
    bomb = npz_bytes(compressed=True, x=np.zeros((4, 1 << 20)), y=np.zeros(4))  # 32 MiB of zeros
    assert len(bomb) < 1 << 20
    with pytest.raises(JobError, match="decompresses to more than 16 MiB"):
        parse_arrays(bomb, "npz", max_bytes=16 << 20)
    x, _, _ = parse_arrays(bomb, "npz", max_bytes=64 << 20)
    assert x.shape == (4, 1 << 20)


# --- no data in errors ------------------------------------------------------------------------------------------

def test_a_csv_error_names_the_cell_never_its_text() -> None:
    with pytest.raises(JobError) as failed:
        parse_arrays(SECRET_CSV, "csv")
    assert str(failed.value) == "csv data row 2, column 2 is not a number"


def test_an_npz_error_quotes_nothing_of_the_file() -> None:
    header = b"{'descr': 'sk-internal-secret', 'fortran_order': False, 'shape': (2,), }"
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + bytes(16))
        archive.writestr("y.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + bytes(16))
    with pytest.raises(JobError, match="cannot read the dataset as npz") as failed:
        parse_arrays(buffer.getvalue(), "npz")
    assert "secret" not in str(failed.value)


# --- through a real node ----------------------------------------------------------------------------------------

def test_a_node_refuses_internal_urls_and_quotes_no_data(api: Api, start_node: Callable[..., NodeProcess],
                                                         serve: Callable[[str, Respond], Server]) -> None:
    internal = serve(INTERNAL, body(b"a,b\n1,internal-secret\n"))
    allowed = serve(ALLOWED, body(SECRET_CSV))
    node = start_node(extra_args=["--allow-http", "--allow-dataset-net", "127.0.0.2/32"])
    [registered] = api.wait_nodes(1)

    def reputation() -> float:
        resp = api.http.get(f"/v1/nodes/{registered['node_id']}", headers=api.headers)
        assert resp.status_code == 200, resp.text
        return float(resp.json()["reputation"])

    before = reputation()
    outcomes = []
    for url in (internal.url + "/data.csv", allowed.url + "/data.csv"):
        spec = {**DIGITS_SPEC, "name": "hostile-url", "dataset": {"url": url, "format": "csv"}, "max_attempts": 3}
        outcomes.append(api.wait_status(api.submit(spec), ("completed", "failed"), 60))
    for job in outcomes:
        assert job["status"] == "failed" and job["attempt"] == 1, job  # the job's fault: final, not retried
        assert "secret" not in job["error"]
    assert "'127.0.0.1' resolves to a loopback address" in outcomes[0]["error"]
    assert internal.paths == []
    assert "csv data row 2, column 2 is not a number" in outcomes[1]["error"]
    assert allowed.paths == ["/data.csv"]
    assert reputation() == before  # the tenant's doing costs the node nothing
    assert node.alive()
