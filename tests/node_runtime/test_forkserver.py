"""The forkserver that warm job processes are forked from, when things go wrong: it dies (its jobs die
with it, so no attempt trains beside an orphan), a job process starts while another must be killed, its
preload fails, or the runtime that would start it is refused; and what it preloads under ``cyxwiz node``."""

from __future__ import annotations

import http.server
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DIGITS_SPEC
from tests.node_runtime.api_proxy import ProxiedNodes
from tests.node_runtime.node_harness import Api, wait_until

pytestmark = pytest.mark.timeout(180)

DATASET_HOST = "127.0.0.2"  # loopback, but not 127.0.0.1: the address a node's operator allows


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class DrippingDataset:
    """An http dataset that never finishes arriving (a byte every 0.2 s): a job downloading it holds still,
    reporting nothing, for as long as the test likes. ``requests`` counts the downloads begun."""

    def __init__(self) -> None:
        self.requests = 0
        self.stopping = threading.Event()
        dataset = self

        class _Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                dataset.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(1 << 20))
                self.end_headers()
                try:
                    while not dataset.stopping.wait(0.2):
                        self.wfile.write(b"1")
                        self.wfile.flush()
                except OSError:
                    pass  # the job process is gone

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((DATASET_HOST, 0), _Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://{DATASET_HOST}:{self.server.server_address[1]}/data.csv"

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture()
def dripping() -> Iterator[DrippingDataset]:
    dataset = DrippingDataset()
    yield dataset
    dataset.close()


@pytest.fixture()
def proxied(api_url: str, creds: dict[str, str], tmp_path: Path,
            request: pytest.FixtureRequest) -> Iterator[ProxiedNodes]:
    nodes = ProxiedNodes(api_url, creds["join_token"], tmp_path)
    yield nodes
    report = getattr(request.node, "rep_call", None)
    nodes.close(print_logs=report is not None and report.failed)


def test_a_killed_forkserver_takes_its_job_processes_with_it(
        api: Api, proxied: ProxiedNodes, dripping: DrippingDataset) -> None:
    """Without its forkserver the runtime sees the job end (code 255), reports a node fault, and its slot
    takes the next job, maybe the next attempt of this one. The job's process must not outlive its server:
    while the runtime's report is held (before it lets go of the process), it is already gone. This one
    would have sat in its download, reporting nothing, for as long as the server dripped."""
    node, proxy = proxied.start("orphans", extra_args=["--allow-http", "--allow-dataset-net", f"{DATASET_HOST}/32"],
                                extra_env={"CYXWIZ_NODE_DATASET_MIN_RATE_BPS": "1"})
    job_id = api.submit({**DIGITS_SPEC, "name": "orphan", "dataset": {"url": dripping.url, "format": "csv"}})
    wait_until(lambda: dripping.requests >= 1, 60, what="the job to download its dataset")
    [pid] = node.job_process_pids()
    server = node.forkserver_pid()
    assert server is not None
    # the OOM killer takes a job process before its forkserver or runtime
    adjust = {p: int(Path(f"/proc/{p}/oom_score_adj").read_text()) for p in (pid, server, node.pid)}
    assert adjust[pid] == 1000 and adjust[server] < 1000 and adjust[node.pid] < 1000, adjust

    lost = proxy.hold(lambda seen: seen.method == "POST" and seen.path == f"/v1/jobs/{job_id}/progress"
                      and (seen.body or {}).get("status") == "failed")
    os.kill(server, signal.SIGKILL)
    assert lost.arrived.wait(60)  # the runtime saw the job end and reports it
    wait_until(lambda: not _alive(pid), 30, what="the job process to die with its forkserver")
    lost.release.set()
    wait_until(lambda: dripping.requests >= 2, 90, what="the next attempt to download the dataset")
    job = api.job(job_id)
    assert job["attempt"] == 2 and job["status"] in ("assigned", "running"), job
    [failed] = [e for e in api.events(job_id) if e["status"] == "failed"]
    assert failed["attempt"] == 1 and "code 255" in failed["error"]  # a node fault, reported by the runtime
    assert node.alive() and node.forkserver_pid() not in (None, server)
    api.cancel(job_id)
