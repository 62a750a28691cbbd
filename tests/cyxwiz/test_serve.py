"""`cyxwiz serve` supervises its children: a killed embedded Valkey or gateway comes back by itself,
and no acknowledged job is lost (append-only file, fsync always)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import redis

from cyxwiz.embedded import free_port
from cyxwiz.server import wait_healthy
from tests.conftest import DIGITS_SPEC, REPO, TEST_ENV, assert_no_secret_on_command_lines, bearer
from tests.node_runtime.node_harness import Api, NodeProcess, long_digits


def wait_for(predicate, timeout_s: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except (httpx.HTTPError, redis.RedisError):
            pass
        time.sleep(0.1)
    return False


def test_serve_restarts_killed_children_and_keeps_jobs() -> None:
    data_dir = tempfile.mkdtemp(prefix="cyxwiz-serve-")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYXWIZ_")} | {"CYXWIZ_DATA_DIR": data_dir}
    server = subprocess.Popen([sys.executable, "-m", "cyxwiz.cli", "serve", "--port", str(port)], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}"
    try:
        assert wait_healthy(api, 30)
        creds = json.loads((Path(data_dir) / "credentials.json").read_text())
        key = bearer(creds["api_key"])
        job_ids = [httpx.post(f"{api}/v1/jobs", json=DIGITS_SPEC, headers=key).json()["job_id"] for _ in range(20)]

        store = redis.Redis.from_url(creds["redis_url"])
        valkey_pid = int(store.info("server")["process_id"])
        store.close()
        os.kill(valkey_pid, signal.SIGKILL)  # a crash: every acknowledged job must be in the AOF
        assert wait_for(lambda: httpx.get(f"{api}/healthz").status_code == 200)
        for job_id in job_ids:
            assert httpx.get(f"{api}/v1/jobs/{job_id}", headers=key).json()["status"] == "queued"

        pattern = f"hypercorn functions.gateway:app --bind 127.0.0.1:{port}"
        gateway_pid = int(subprocess.check_output(["pgrep", "-f", pattern], text=True).split()[0])
        os.kill(gateway_pid, signal.SIGKILL)
        assert wait_for(lambda: httpx.get(f"{api}/v1/jobs/{job_ids[0]}", headers=key).status_code == 200)
    finally:
        server.terminate()
        assert server.wait(30) == 0


def _serve_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYXWIZ_")}
    return env | TEST_ENV | {"CYXWIZ_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}


def _start_serve(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "cyxwiz.cli", "serve", "--port", str(port)],
                                env=_serve_env(data_dir), cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def _files(data_dir: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under the data dir with its mode, mtime and contents, less the running store's
    append-only log and its own log (the first server writes them all the time)."""
    return {str(p.relative_to(data_dir)): (p.stat().st_mode, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(data_dir.rglob("*"))
            if p.is_file() and "appendonly" not in p.name and p.name != "valkey.log"}


def test_a_second_serve_on_a_data_dir_or_port_in_use_exits_at_once_and_changes_nothing(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "data", free_port()
    first = _start_serve(data_dir, port, tmp_path / "first.log")
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}", 30)
        before = _files(data_dir)
        before_store = sorted(p.name for p in (data_dir / "valkey").iterdir())
        for argv, env_dir, said in (
                (["--port", str(free_port())], data_dir, "is using the data dir"),  # same data dir
                (["--port", str(port)], tmp_path / "other", "in use"),  # same port, another data dir
        ):
            started = time.monotonic()
            second = subprocess.run([sys.executable, "-m", "cyxwiz.cli", "serve", *argv], env=_serve_env(env_dir),
                                    cwd=REPO, capture_output=True, text=True, timeout=60)
            assert second.returncode == 1 and said in second.stderr, second.stderr
            assert "serving on" not in second.stdout + second.stderr
            assert time.monotonic() - started < 15  # at once: no store, no gateway was started
            assert _files(data_dir) == before  # credentials.json, the ACL file, the node keys: untouched
            assert not (tmp_path / "other").exists()
            assert sorted(p.name for p in (data_dir / "valkey").iterdir()) == before_store
        assert first.poll() is None and httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        first.terminate()
        assert first.wait(30) == 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ctrl_c_and_restart_keeps_the_cluster(tmp_path: Path) -> None:
    """Ctrl-C `cyxwiz serve` with a node training, stay down longer than the node TTL, start it again:
    the store is back on its port, the node keeps its session and its store user, the job in flight
    finishes on its first attempt, and the next job placed on the node completes."""
    data_dir, port = tmp_path / "data", free_port()
    api_url = f"http://127.0.0.1:{port}"
    serve = _start_serve(data_dir, port, tmp_path / "serve.log")
    node = None
    try:
        assert wait_healthy(api_url, 30)
        creds = json.loads((data_dir / "credentials.json").read_text())
        node = NodeProcess(api_url, creds["join_token"], tmp_path / "node.log", name="steady",
                           extra_env={"CYXWIZ_DATA_DIR": str(data_dir), "CYXWIZ_NODE_RETRY_MAX_S": "1"}).start()
        with httpx.Client(base_url=api_url, timeout=10) as http:
            api = Api(http, creds["api_key"])
            [before] = api.wait_nodes(1, timeout_s=60)
            job_id = api.submit(long_digits(40))
            api.wait_progress(job_id, min_step=20, timeout_s=60)

        serve.send_signal(signal.SIGINT)  # Ctrl-C
        assert serve.wait(30) == 0
        time.sleep(4)  # down for twice the 2 s TTL: no heartbeat can land
        serve = _start_serve(data_dir, port, tmp_path / "serve.log")
        assert wait_healthy(api_url, 30)
        again = json.loads((data_dir / "credentials.json").read_text())
        assert again["store_port"] == creds["store_port"] and again["redis_url"] == creds["redis_url"]

        with httpx.Client(base_url=api_url, timeout=10) as http:
            api = Api(http, creds["api_key"])
            job = api.wait_status(job_id, ("completed", "failed"), 120)
            assert job["status"] == "completed", job["error"] + node.log()
            assert job["attempt"] == 1 and job["node_id"] == before["node_id"]  # no bounce, no restart
            next_job = api.wait_status(api.submit(DIGITS_SPEC), ("completed", "failed"), 90)
            assert next_job["status"] == "completed" and next_job["node_id"] == before["node_id"], node.log()
        assert "registering again" not in node.log()

        # secrets at rest: private files in private directories
        for path in (data_dir, data_dir / "valkey", data_dir / "nodes"):
            assert path.stat().st_mode & 0o777 == 0o700, path
        secret_files = [data_dir / "credentials.json", data_dir / "valkey" / "users.acl",
                        data_dir / "nodes" / "steady.key", data_dir / "nodes" / "steady.json",
                        *(data_dir / "valkey").rglob("appendonly*")]
        assert len(secret_files) > 5
        for path in secret_files:
            if path.is_file():
                assert path.stat().st_mode & 0o777 == 0o600, path
        # and none on a command line
        assert_no_secret_on_command_lines([creds["join_token"], creds["api_key"], creds["store_admin_password"],
                                           creds["store_gateway_password"],
                                           (data_dir / "nodes" / "steady.key").read_text().strip()])
    finally:
        if node is not None:
            node.stop()
        serve.terminate()
        serve.wait(30)


def _private_ca_and_certificate(where: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA, and a certificate it signed for 127.0.0.1: (ca.crt, api.crt, api.key)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", "/CN=cyxwiz test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "api.key", "-out", "api.csr", "-subj", "/CN=127.0.0.1")
    (where / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "api.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            "api.crt", "-days", "1", "-extfile", "san.ext")
    return where / "ca.crt", where / "api.crt", where / "api.key"


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_serve_over_https_and_a_node_that_trusts_a_private_ca(tmp_path: Path) -> None:
    ca, cert, key = _private_ca_and_certificate(tmp_path)
    data_dir, port = tmp_path / "data", free_port()
    with open(tmp_path / "serve.log", "ab") as out:
        serve = subprocess.Popen([sys.executable, "-m", "cyxwiz.cli", "serve", "--port", str(port), "--certfile",
                                  str(cert), "--keyfile", str(key)], env=_serve_env(data_dir), cwd=REPO,
                                 stdout=out, stderr=subprocess.STDOUT)
    api_url = f"https://127.0.0.1:{port}"
    node = None
    try:
        assert wait_healthy(api_url, 30), (tmp_path / "serve.log").read_text()
        creds = json.loads((data_dir / "credentials.json").read_text())
        assert creds["api_url"] == api_url
        with pytest.raises(httpx.ConnectError):  # not a certificate the system trusts
            httpx.get(api_url + "/healthz")
        node = NodeProcess(api_url, creds["join_token"], tmp_path / "node.log", name="tls-node",
                           extra_args=["--ca-file", str(ca)], extra_env={"CYXWIZ_DATA_DIR": str(data_dir)}).start()
        with httpx.Client(base_url=api_url, timeout=10, verify=ssl.create_default_context(cafile=str(ca))) as http:
            api = Api(http, creds["api_key"])
            api.wait_nodes(1, timeout_s=60)
            job = api.wait_status(api.submit(DIGITS_SPEC), ("completed", "failed"), 90)
            assert job["status"] == "completed", job["error"] + node.log()  # the job process trusts it too
    finally:
        if node is not None:
            node.stop()
        serve.terminate()
        serve.wait(30)
