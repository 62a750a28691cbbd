"""``cyxwiz demo`` and ``cyxwiz up``: whole clusters on this machine, started and stopped cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from cyxwiz.embedded import free_port
from cyxwiz.server import wait_healthy
from node_runtime.training import load_trained_model
from tests.conftest import DIGITS_SPEC, REPO, assert_no_secret_on_command_lines, bearer
from tests.node_runtime.node_harness import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CYXWIZ_")}
    return {**env, "HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}


def test_cyxwiz_demo_trains_the_digits_mlp_and_exits_0(tmp_path: Path) -> None:
    output = tmp_path / "weights" / "digits.safetensors"
    temp = tmp_path / "tmp"
    temp.mkdir()
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "cyxwiz.cli", "demo", "--output", str(output)], cwd=tmp_path,
                         env={**_clean_env(tmp_path), "TMPDIR": str(temp)}, capture_output=True, text=True,
                         timeout=120)
    wall_s = time.monotonic() - started
    assert run.returncode == 0, run.stdout + run.stderr
    match = re.search(r"validation accuracy (0\.\d+)", run.stdout)
    assert match and float(match.group(1)) >= 0.95, run.stdout
    assert f"weights downloaded to {output}" in run.stdout and "they load into the model" in run.stdout
    assert "completed  epoch 10/10" in run.stdout  # the progress bar's last line
    assert load_trained_model(output)(torch.rand(1, 64) * 16).shape == (1, 10)
    assert "demo cluster stopped" in run.stdout and "killed" not in run.stdout
    assert list(temp.glob("cyxwiz-demo-*")) == []  # the demo's temporary data dir is gone
    assert wall_s < 60, f"the demo took {wall_s:.1f} s"


def test_cyxwiz_up_runs_a_cluster_until_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "cluster"
    up = subprocess.Popen([sys.executable, "-m", "cyxwiz.cli", "up", "--nodes", "2", "--port", str(port),
                           "--data-dir", str(data_dir)], cwd=REPO, env=_clean_env(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    api_url = f"http://127.0.0.1:{port}"
    try:
        assert wait_healthy(api_url, 60)
        creds = json.loads((data_dir / "credentials.json").read_text())
        with httpx.Client(base_url=api_url, headers=bearer(creds["api_key"]), timeout=10) as http:
            nodes = wait_until(lambda: len(found := [n for n in http.get("/v1/nodes").json()["nodes"]
                                                     if n["status"] == "online"]) == 2 and found, 60,
                               what="two local node runtimes")
            assert sorted(n["name"] for n in nodes) == ["local-1", "local-2"]
            # the join token reaches the nodes through their environment, never their command lines
            assert_no_secret_on_command_lines([creds[name] for name in (
                "join_token", "api_key", "store_admin_password", "store_gateway_password")])
            job_id = http.post("/v1/jobs", json=DIGITS_SPEC).json()["job_id"]
            job = wait_until(lambda: (j := http.get(f"/v1/jobs/{job_id}").json())["status"] in ("completed", "failed")
                             and j, 60, what="the job to end")
            assert job["status"] == "completed", job["error"]
        up.send_signal(signal.SIGINT)  # Ctrl-C
        output, _ = up.communicate(timeout=60)
        assert up.returncode == 0, output.decode()
        assert b"stopping the cluster" in output
        with pytest.raises(httpx.TransportError):
            httpx.get(api_url + "/healthz", timeout=2)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
