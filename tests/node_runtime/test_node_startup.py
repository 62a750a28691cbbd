"""How fast and how safely a node starts, and a job with it: the runtime registers without importing
torch, and job processes are forked from a warm forkserver (one process per job, as before), or spawned
cold with --no-warm-processes. Timings are measured by ``python -m load_tests.startup``, never asserted
here: only that ``startup_s`` is reported."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pytest

from node_runtime.device import nvidia_driver_present
from node_runtime.settings import add_node_arguments, settings_from_args
from node_runtime.supervisor import BASE_MEMORY_MB
from tests.conftest import DIGITS_SPEC, REPO
from tests.node_runtime.node_harness import Api, NodeProcess, long_digits, process_alive, wait_until

pytestmark = pytest.mark.timeout(120)


def _status(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {field} for pid {pid}")


def _mapped(pid: int, library: str) -> bool:
    return library in Path(f"/proc/{pid}/maps").read_text()


def _startup_seconds(api: Api, job_id: str) -> list[float]:
    return [e["metrics"]["startup_s"] for e in api.events(job_id) if "startup_s" in e["metrics"]]


def _one_job_process(node: NodeProcess) -> int:
    [pid] = wait_until(node.job_process_pids, 60, what="the job process")
    return pid


def test_a_warm_job_runs_in_a_process_of_its_own_forked_from_the_preloaded_server(
        api: Api, start_node: Callable[..., NodeProcess]) -> None:
    node = start_node()
    [registered] = api.wait_nodes(1)
    job_id = api.submit(long_digits(60))
    api.wait_progress(job_id, min_step=20, timeout_s=60)
    pid = _one_job_process(node)
    server = node.forkserver_pid()
    assert server is not None and pid not in (node.pid, server)  # one process per job, not the runtime
    assert int(_status(pid, "PPid")) == server
    # the server preloaded torch before forking, and forks from a single thread with no CUDA driver loaded
    assert _mapped(server, "libtorch") and not _mapped(server, "libcuda")
    assert _status(server, "Threads") == "1"
    # a fork counts the pages it shares with the server, as a spawned process counts its own torch: well
    # within what the runtime allows a job beyond its estimate
    rss_mb = int(_status(pid, "VmRSS").split()[0]) // 1024
    assert 100 < rss_mb < BASE_MEMORY_MB[registered["capabilities"]["device"]], rss_mb
    if not nvidia_driver_present():  # the runtime itself imports torch only to ask it about GPUs
        assert not _mapped(node.pid, "libtorch")

    job = api.wait_status(job_id, ("completed", "failed"), 90)
    assert job["status"] == "completed", job["error"]
    wait_until(lambda: not process_alive(pid), 10, what="the job process to exit")
    startup = _startup_seconds(api, job_id)
    assert len(startup) == 1 and isinstance(startup[0], float) and startup[0] > 0  # sent once per attempt
    assert process_alive(server) and node.alive()


def test_cold_job_processes_are_spawned_and_report_startup_s(
        api: Api, start_node: Callable[..., NodeProcess]) -> None:
    node = start_node(extra_args=["--no-warm-processes"])
    api.wait_nodes(1)
    job_id = api.submit(long_digits(60))
    api.wait_progress(job_id, min_step=20, timeout_s=60)
    pid = _one_job_process(node)
    assert node.forkserver_pid() is None and int(_status(pid, "PPid")) == node.pid
    job = api.wait_status(job_id, ("completed", "failed"), 90)
    assert job["status"] == "completed", job["error"]
    assert all(s > 0 for s in _startup_seconds(api, job_id))


def test_a_killed_warm_job_takes_neither_the_runtime_nor_the_forkserver_down(
        api: Api, start_node: Callable[..., NodeProcess]) -> None:
    node = start_node()
    job_id = api.submit(long_digits(40))
    api.wait_progress(job_id, min_step=30, timeout_s=60)
    pid = _one_job_process(node)
    server = node.forkserver_pid()
    os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
    job = api.wait_status(job_id, ("completed", "failed"), 90)
    assert job["status"] == "completed" and job["attempt"] == 2, job["error"]
    [failed] = [e for e in api.events(job_id) if e["status"] == "failed"]
    assert "SIGKILL" in str(failed["error"])
    assert node.alive() and node.forkserver_pid() == server and server is not None and process_alive(server)

    next_job = api.wait_status(api.submit(DIGITS_SPEC), ("completed", "failed"), 60)
    assert next_job["status"] == "completed", next_job["error"]


def test_a_killed_forkserver_costs_its_running_job_one_attempt_and_is_started_again(
        api: Api, start_node: Callable[..., NodeProcess]) -> None:
    """The runtime learns a forked job's exit code from the forkserver: without it the job looks ended
    (node fault, retried), and its process stops at its next report, which the control plane refuses."""
    node = start_node()
    job_id = api.submit(long_digits(40))
    api.wait_progress(job_id, min_step=30, timeout_s=60)
    pid = _one_job_process(node)
    server = node.forkserver_pid()
    assert server is not None
    os.kill(server, signal.SIGKILL)
    job = api.wait_status(job_id, ("completed", "failed"), 90)
    assert job["status"] == "completed" and job["attempt"] == 2, job["error"]
    wait_until(lambda: not process_alive(pid), 30, what="the first attempt's process to stop")
    assert node.alive() and node.forkserver_pid() not in (None, server)


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
def test_sigkill_of_the_runtime_ends_its_job_process_and_the_forkserver(
        api: Api, start_node: Callable[..., NodeProcess], warm: bool) -> None:
    node = start_node(extra_args=["--warm-processes" if warm else "--no-warm-processes"])
    job_id = api.submit(long_digits(300))
    api.wait_progress(job_id, min_step=20, timeout_s=60)
    pid = _one_job_process(node)
    server = node.forkserver_pid()
    assert (server is not None) == warm
    node.signal(signal.SIGKILL)
    node.wait(10)
    # neither trains on nor waits for a node that is gone: the job is requeued once the node's TTL lapses
    left = [pid, server] if server is not None else [pid]
    wait_until(lambda: not any(process_alive(p) for p in left), 10, what="the job process and the forkserver to exit")


def test_the_warm_processes_setting() -> None:
    parser = argparse.ArgumentParser()
    add_node_arguments(parser)

    def warm(*argv: str, env: dict[str, str] | None = None) -> bool:
        args = parser.parse_args(["--join-token", "t", "--data-dir", "/nonexistent", *argv])
        return settings_from_args(args, env=env or {}).warm_processes

    assert warm() and warm("--warm-processes", env={"CYXWIZ_NODE_WARM_PROCESSES": "0"})
    assert not warm("--no-warm-processes") and not warm(env={"CYXWIZ_NODE_WARM_PROCESSES": "off"})


@pytest.mark.skipif(nvidia_driver_present(), reason="this host has an NVIDIA driver: torch is asked")
def test_capabilities_of_a_host_without_nvidia_driver_need_no_torch() -> None:
    run = subprocess.run([sys.executable, "-c",
        "import json, sys\n"
        "from node_runtime.device import detect_capabilities\n"
        "caps = detect_capabilities('auto')\n"
        "try:\n"
        "    detect_capabilities('cuda')\n"
        "except RuntimeError as error:\n"
        "    caps['cuda_error'] = str(error)\n"
        "print(json.dumps({**caps, 'torch_imported': 'torch' in sys.modules}))\n"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    caps = json.loads(run.stdout)
    assert caps["device"] == "cpu" and caps["gpus"] == [] and not caps["torch_imported"]
    assert caps["torch_version"] == metadata.version("torch")
    assert "--device cuda was asked for, but this host has no NVIDIA driver" in caps["cuda_error"]
