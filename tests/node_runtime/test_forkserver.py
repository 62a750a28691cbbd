"""The forkserver that warm job processes are forked from, when things go wrong: it dies (its jobs die
with it, so no attempt trains beside an orphan), a job process starts while another must be killed, its
preload fails, or the runtime that would start it is refused; and what it preloads under ``cyxwiz node``."""

from __future__ import annotations

import http.server
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import certifi
import pytest

from tests.conftest import DIGITS_SPEC, REPO
from tests.node_runtime.api_proxy import ProxiedNodes
from tests.node_runtime.node_harness import Api, NodeProcess, process_alive, wait_until

pytestmark = pytest.mark.timeout(180)

DATASET_HOST = "127.0.0.2"  # loopback, but not 127.0.0.1: the address a node's operator allows


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
    wait_until(lambda: not process_alive(pid), 30, what="the job process to die with its forkserver")
    lost.release.set()
    wait_until(lambda: dripping.requests >= 2, 90, what="the next attempt to download the dataset")
    job = api.job(job_id)
    assert job["attempt"] == 2 and job["status"] in ("assigned", "running"), job
    [failed] = [e for e in api.events(job_id) if e["status"] == "failed"]
    assert failed["attempt"] == 1 and "code 255" in failed["error"]  # a node fault, reported by the runtime
    assert node.alive() and node.forkserver_pid() not in (None, server)
    api.cancel(job_id)


# A kill asked while another job process is starting. The forkserver is stopped (SIGSTOP), as it is busy
# while it preloads: the second start waits for it, holding the pipes the runtime reads exit codes from.
KILL_DURING_A_START = r"""
import os, signal, sys, threading, time
from node_runtime.executor import JobProcess, exit_codes_readable, job_process_context, start_forkserver
from node_runtime.job_control import JobLaunch
from tests.node_runtime.node_harness import child_pids, wait_until

def launch(job_id):  # an API that is not there: the job retries its first calls until it is killed
    return JobLaunch(job_id=job_id, attempt=1, spec={}, node_id="n-test", api_url="http://127.0.0.1:9",
                     ca_file=None, session_token="t", device="cpu", torch_threads=1, data_root=None,
                     allow_http=False, assigned_at=time.monotonic(), retry_max_s=0.5)

context = job_process_context(True)
start_forkserver(context)
running = JobProcess(launch("j-running"), context)
running.start()
assert running.start_error is None and running.exitcode is None, running.describe_exit()
[server] = [p for p in child_pids(os.getpid()) if b"forkserver" in open(f"/proc/{p}/cmdline", "rb").read()]
os.kill(server, signal.SIGSTOP)
starting = JobProcess(launch("j-starting"), context)
thread = threading.Thread(target=starting.start)
thread.start()

def start_under_way():
    with exit_codes_readable() as readable:
        return not readable

wait_until(start_under_way, 30, what="the second start to wait for the forkserver")
running.kill("asked during a start")
print("during the start:", running.killed_for, running.exitcode)
os.kill(server, signal.SIGCONT)
thread.join()
running.kill_if_asked()  # the supervisor's next watch round
code = wait_until(lambda: running.exitcode, 30, what="the running job to be killed")
print("after the start:", code, running.describe_exit())
starting.kill("the test is over")
wait_until(lambda: starting.exitcode, 30, what="the second job to be killed")
"""


def test_a_kill_asked_while_another_job_process_starts_waits_for_the_start() -> None:
    """While a start holds the forkserver's pipes no exit can be read, so a pid may be one the forkserver
    reaped (and the kernel handed on): the kill is not sent then, but as soon as the start is over."""
    run = subprocess.run([sys.executable, "-c", KILL_DURING_A_START], cwd=REPO, capture_output=True, text=True,
                         timeout=150)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "during the start: None None", run.stdout
    assert lines[1] == ("after the start: -9 the job process was killed by the node runtime: asked during a start")


def _imports(log: str, module: str) -> int:
    """How many processes imported ``module`` (python -X importtime: one line per import done)."""
    return len(re.findall(rf"^import time:.*\|\s+{re.escape(module)}\s*$", log, re.MULTILINE))


def test_under_the_cyxwiz_command_the_forkserver_preloads_its_module_for_every_job(
        api: Api, api_url: str, creds: dict[str, str], tmp_path: Path) -> None:
    """`cyxwiz node` runs as a console script: every job process runs that script again as its __main__,
    and it imports cyxwiz.cli; the forkserver imports it once, before the first fork."""
    node = NodeProcess(api_url, creds["join_token"], tmp_path / "node.log", name="cli-node",
                       extra_env={"PYTHONPROFILEIMPORTTIME": "1", "CYXWIZ_DATA_DIR": str(tmp_path / "data")})
    assert node.command[1:3] == ["-m", "node_runtime"]
    node.command = [str(Path(sys.executable).parent / "cyxwiz"), "node", *node.command[3:]]
    node.start()
    try:
        first = api.wait_status(api.submit(DIGITS_SPEC), ("completed", "failed"), 90)
        assert first["status"] == "completed", first["error"]
        before = node.log()
        assert _imports(before, "cyxwiz.cli") == 2, before[-3000:]  # the runtime, and its forkserver
        second = api.wait_status(api.submit(DIGITS_SPEC), ("completed", "failed"), 90)
        assert second["status"] == "completed", second["error"]
        assert _imports(node.log()[len(before):], "cyxwiz.cli") == 0  # the second job imported nothing of it
    finally:
        node.stop()


def test_a_preload_that_fails_costs_the_jobs_their_warm_start_only(
        api: Api, start_node: Callable[..., NodeProcess], tmp_path: Path) -> None:
    """The preload builds the default TLS context, which a bad SSL_CERT_FILE breaks; this node's jobs use
    its --ca-file. A server dead of its preload would fail every job start, and be started again for each."""
    node = start_node(extra_args=["--ca-file", certifi.where()],
                      extra_env={"SSL_CERT_FILE": str(tmp_path / "missing.pem")})
    for _ in range(2):
        job = api.wait_status(api.submit(DIGITS_SPEC), ("completed", "failed"), 90)
        assert job["status"] == "completed" and job["attempt"] == 1, job["error"]
    assert "preloading the job processes' code failed" in node.log()
    assert node.forkserver_pid() is not None


REFUSED_RUNTIME = r"""
import argparse, os, sys, threading
from node_runtime.agent import NodeAgent
from node_runtime.identity import identity_path, lock_identity
from node_runtime.settings import add_node_arguments, settings_from_args
from tests.node_runtime.node_harness import child_pids

parser = argparse.ArgumentParser()
add_node_arguments(parser)
settings = settings_from_args(parser.parse_args(["--api", "http://127.0.0.1:9", "--join-token", "t",
                                                 "--data-dir", sys.argv[1], "--name", "taken"]), env={})
held = lock_identity(identity_path(settings.state_dir, settings.name))  # another runtime of that name
assert held is not None
try:
    NodeAgent(settings)
except RuntimeError as error:
    print("refused:", error)
for thread in threading.enumerate():
    if thread is not threading.main_thread():
        thread.join()
print("children:", child_pids(os.getpid()))
"""


def test_a_runtime_refused_for_its_name_starts_no_forkserver(tmp_path: Path) -> None:
    """A second runtime of a name is refused as it is constructed: it must not pay the preload (seconds of
    a core) nor leave a forkserver behind."""
    run = subprocess.run([sys.executable, "-c", REFUSED_RUNTIME, str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "refused: another node runtime named 'taken'" in run.stdout
    assert "children: []" in run.stdout, run.stdout
