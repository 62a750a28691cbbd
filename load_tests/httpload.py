"""A fast closed-loop HTTP/1.1 load generator: fixed concurrency, keep-alive, prepared raw requests.

A workload is a list of raw request templates; each connection sends the next one as soon as the
previous answer is in (closed loop, like wrk). A template may hold :data:`SEQ` (ten bytes), replaced
by a counter that grows by one per request, padded with spaces to the same width (JSON allows the
whitespace, so Content-Length stays fixed): progress reports need a growing ``seq``.

Two engines, same workload, same answer shape:
- ``wrk`` (C, HdrHistogram) when it is on PATH: Debian's ``apt-get install -y wrk``;
- otherwise an asyncio raw-socket client on uvloop (pure Python; it can drive one Hypercorn core,
  but check ``client_cpu`` in results: near 100 % means the generator, not the server, limits).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

SEQ = b"@@@@@@@@@@"


def raw_request(host: str, method: str, path: str, token: str | None = None, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> bytes:
    """One HTTP/1.1 keep-alive request as bytes."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


@dataclass
class LoadResult:
    engine: str
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int]
    errors: int
    client_cpu: float | None = None  # fraction of one core the generator used (asyncio engine only)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def engine_name() -> str:
    return "wrk" if shutil.which("wrk") else "asyncio"


def run_load(url: str, templates: list[bytes], *, concurrency: int, duration_s: float,
             engine: str | None = None, cpus: str | None = None, seq_start: int = 0) -> LoadResult:
    """Drive ``templates`` (cycled) at ``url`` with ``concurrency`` connections for ``duration_s``;
    :data:`SEQ` counts up from ``seq_start``."""
    engine = engine or engine_name()
    if engine == "wrk":
        return _run_wrk(url, templates, concurrency, duration_s, cpus, seq_start)
    return _run_asyncio_subprocess(url, templates, concurrency, duration_s, cpus, seq_start)


# --- wrk -----------------------------------------------------------------------------------------------

_WRK_SCRIPT = r"""
local threads = {}
setup = function(thread) table.insert(threads, thread) end
reqs = dofile("%(data)s")
local i, seq = 0, %(seq_start)d
statuses = {}
local function pad(n) local s = tostring(n) return s .. string.rep(' ', 10 - #s) end
request = function()
  i = i %% #reqs + 1
  seq = seq + 1
  local r = reqs[i]
  if string.find(r, '@@@@@@@@@@', 1, true) then r = string.gsub(r, '@@@@@@@@@@', pad(seq)) end
  return r
end
response = function(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
done = function(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    for k, v in pairs(thread:get("statuses")) do counts[k] = (counts[k] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(counts) do table.insert(parts, string.format('"%%d": %%d', k, v)) end
  io.write(string.format('\nWRK_JSON {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, '
    .. '"errors": %%d, "statuses": {%%s}}\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    table.concat(parts, ', ')))
end
"""


def _lua_string(raw: bytes) -> str:
    return '"' + "".join(f"\\{b:03d}" if b < 32 or b in (34, 92) or b > 126 else chr(b) for b in raw) + '"'


def _run_wrk(url: str, templates: list[bytes], concurrency: int, duration_s: float, cpus: str | None,
             seq_start: int) -> LoadResult:
    with tempfile.TemporaryDirectory(prefix="cyxwiz-wrk-") as tmp:
        data = Path(tmp) / "requests.lua"
        data.write_text("return {\n" + ",\n".join(_lua_string(t) for t in templates) + "\n}\n")
        script = Path(tmp) / "load.lua"
        script.write_text(_WRK_SCRIPT % {"data": str(data), "seq_start": seq_start})
        command = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s", "--timeout", "10s",
                   "-s", str(script), url]
        if cpus and shutil.which("taskset"):
            command = ["taskset", "-c", cpus, *command]
        out = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 60)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    got = json.loads(line[len("WRK_JSON "):])
    duration = got["duration_us"] / 1e6
    return LoadResult("wrk", got["requests"], duration, got["requests"] / duration, got["p50_us"] / 1000,
                      got["p99_us"] / 1000, got["statuses"], got["errors"])


# --- asyncio fallback ------------------------------------------------------------------------------------

def _run_asyncio_subprocess(url: str, templates: list[bytes], concurrency: int, duration_s: float,
                            cpus: str | None, seq_start: int) -> LoadResult:
    """The asyncio engine in its own process, so it can be pinned away from the server's core."""
    with tempfile.TemporaryDirectory(prefix="cyxwiz-load-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"url": url, "templates": [t.decode("latin-1") for t in templates],
                                    "concurrency": concurrency, "duration_s": duration_s,
                                    "seq_start": seq_start}))
        import sys

        command = [sys.executable, "-m", "load_tests.httpload", str(spec)]
        if cpus and shutil.which("taskset"):
            command = ["taskset", "-c", cpus, *command]
        out = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 60,
                             cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr}")
    return LoadResult(**json.loads(out.stdout.strip().splitlines()[-1]))


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response off the connection: its status and body (Content-Length framed)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, (await reader.readexactly(length) if length else b"")


async def drive(url: str, templates: list[bytes], concurrency: int, duration_s: float,
                seq_start: int = 0) -> LoadResult:
    """Closed loop with ``concurrency`` keep-alive connections; latencies of every request."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    parts = [t.split(SEQ) for t in templates]
    counter = seq_start
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors = 0
    start = time.perf_counter()
    deadline = start + duration_s

    async def worker(offset: int) -> None:
        nonlocal counter, errors
        reader, writer = await asyncio.open_connection(host, port)
        i = offset
        try:
            while time.perf_counter() < deadline:
                counter += 1
                pieces = parts[i % len(parts)]
                i += 1
                request = pieces[0] if len(pieces) == 1 else str(counter).ljust(10).encode().join(pieces)
                sent = time.perf_counter()
                writer.write(request)
                try:
                    status, _ = await _read_response(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                latencies.append(time.perf_counter() - sent)
                statuses[status] += 1
        finally:
            writer.close()

    cpu_before = time.process_time()
    await asyncio.gather(*(worker(k * max(1, len(templates) // concurrency)) for k in range(concurrency)))
    elapsed = time.perf_counter() - start
    cpu = (time.process_time() - cpu_before) / elapsed
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000 if latencies else 0.0

    return LoadResult("asyncio", len(latencies), elapsed, len(latencies) / elapsed, pct(50), pct(99),
                      {str(k): v for k, v in statuses.items()}, errors, round(cpu, 3))


def _main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    main = drive(spec["url"], [t.encode("latin-1") for t in spec["templates"]], spec["concurrency"],
                 spec["duration_s"], spec["seq_start"])
    try:
        import uvloop

        result = uvloop.run(main)
    except ImportError:
        result = asyncio.run(main)
    print(json.dumps(result.as_dict()))


if __name__ == "__main__":
    import sys

    _main(sys.argv[1])
    os._exit(0)


async def request_json(url: str, method: str, path: str, token: str | None = None,
                       body: Any = None) -> tuple[int, Any]:
    """One request on a fresh connection; (status, decoded JSON body or None)."""
    parsed = urlparse(url)
    reader, writer = await asyncio.open_connection(parsed.hostname, parsed.port or 80)
    try:
        payload = None if body is None else json.dumps(body).encode()
        writer.write(raw_request(f"{parsed.hostname}:{parsed.port}", method, path, token, payload))
        status, data = await _read_response(reader)
    finally:
        writer.close()
    return status, (json.loads(data) if data else None)
