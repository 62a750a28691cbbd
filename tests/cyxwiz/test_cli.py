"""The `cyxwiz` client commands against a real `cyxwiz serve`, configured only by its credentials file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cyxwiz.embedded import free_port
from cyxwiz.server import wait_healthy
from tests.conftest import REPO, bearer, model_weights


@pytest.fixture(scope="module")
def served() -> Iterator[dict[str, str]]:
    data_dir = tempfile.mkdtemp(prefix="cyxwiz-cli-")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYXWIZ_")} | {"CYXWIZ_DATA_DIR": data_dir}
    server = subprocess.Popen([sys.executable, "-m", "cyxwiz.cli", "serve", "--port", str(port), "--workers", "2"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_healthy(f"http://127.0.0.1:{port}", 30)
    creds = json.loads((Path(data_dir) / "credentials.json").read_text())
    yield {**creds, "data_dir": data_dir, "env": env}  # type: ignore[dict-item]
    server.terminate()
    assert server.wait(30) == 0


def cli(served: dict, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cyxwiz.cli", *args], env=served["env"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_credentials_file(served: dict) -> None:
    path = Path(served["data_dir"]) / "credentials.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert {"api_url", "api_key", "join_token", "redis_url"} <= set(served)


def test_submit_status_jobs_cancel_watch(served: dict) -> None:
    out = cli(served, "submit", str(REPO / "examples" / "digits-mlp.json"))
    assert out.returncode == 0, out.stderr
    job_id = json.loads(out.stdout)["job_id"]
    status = json.loads(cli(served, "status", job_id).stdout)
    assert status["status"] == "queued" and status["spec"]["model"]["hidden"] == [128, 64]
    assert job_id in cli(served, "jobs").stdout
    assert json.loads(cli(served, "cancel", job_id).stdout)["status"] == "cancelled"
    watched = cli(served, "watch", job_id)
    assert watched.returncode == 1 and "cancelled" in watched.stdout  # ended, but not completed
    again = cli(served, "cancel", job_id)
    assert again.returncode == 1 and "job_terminal" in again.stderr


def test_keys_nodes_download(served: dict, tmp_path: Path) -> None:
    created = cli(served, "keys", "create", "--tenant", "acme")
    assert created.returncode == 0 and json.loads(created.stdout)["tenant"] == "acme"
    api = served["api_url"]
    reg = httpx.post(f"{api}/v1/nodes", json={"name": "cli-node"}, headers=bearer(served["join_token"])).json()
    assert "cli-node" in cli(served, "nodes").stdout
    job_id = json.loads(cli(served, "submit", str(REPO / "examples" / "digits-mlp.json")).stdout)["job_id"]
    weights = model_weights()
    httpx.put(f"{api}/v1/jobs/{job_id}/artifacts/model.safetensors", content=weights,
              headers=bearer(reg["session_token"]))
    target = tmp_path / "w.safetensors"
    assert cli(served, "download", job_id, "-o", str(target)).returncode == 0
    assert target.read_bytes() == weights


def test_bad_input_is_reported(served: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"type": "mlp"}, "dataset": {"name": "digits"}, "training": {"epochs": 0}}')
    out = cli(served, "submit", str(bad))
    assert out.returncode == 1 and "invalid_field" in out.stderr and "training.epochs" in out.stderr
    assert cli(served, "status", "j-nope").returncode == 1


def test_server_strings_cannot_drive_the_terminal(served: dict[str, Any], tmp_path: Path) -> None:
    """Names and errors come from the server (a node, a tenant, another user): the CLI shows control
    characters as visible escapes, never raw (an ESC sequence could recolour, clear or forge output)."""
    import redis

    from cyxwiz.cli import printable
    from shared import keys
    from tests.conftest import DIGITS_SPEC

    api, admin = served["api_url"], bearer(served["api_key"])
    labels = {"cli-test": "escapes"}  # the job goes to this node, whatever else the module left queued
    reg = httpx.post(f"{api}/v1/nodes", json={"name": "cli-escapes", "labels": labels, "slots": 4},
                     headers=bearer(served["join_token"])).json()
    spec = {**DIGITS_SPEC, "requirements": {"labels": labels}}
    job_id = httpx.post(f"{api}/v1/jobs", json=spec, headers=admin).json()["job_id"]
    error = "boom \x1b[31mred\x1b[0m\r\nTraceback line 2\x7f\x9b2J\u202e"
    resp = httpx.post(f"{api}/v1/jobs/{job_id}/progress", headers=bearer(reg["session_token"]),
                      json={"attempt": 1, "seq": 1, "status": "failed", "error": error, "fault": "job"})
    assert resp.status_code == 200, resp.text
    store = redis.Redis.from_url(served["redis_url"], decode_responses=True)  # a name stored by an older server
    store.hset(keys.node_key(reg["node_id"]), "name", "evil\x1b]0;pwned\x07node")
    store.close()
    bad_spec = tmp_path / "bad.json"
    bad_spec.write_text(json.dumps({**DIGITS_SPEC, "\x1b[2Jfield": 1}))
    raw = ("\x1b", "\x7f", "\x9b", "\x07", "\r", "\u202e")
    outputs = {args: cli(served, *args) for args in (("status", job_id), ("jobs",), ("watch", job_id), ("nodes",),
                                                      ("submit", str(bad_spec)))}
    for args, out in outputs.items():
        assert not any(c in out.stdout + out.stderr for c in raw), (args, out.stdout, out.stderr)
    assert json.loads(outputs[("status", job_id)].stdout)["error"] == error  # still the exact JSON
    watched = outputs[("watch", job_id)]
    assert "boom \\x1b[31mred\\x1b[0m\\x0d\nTraceback line 2\\x7f\\x9b2J\\u202e" in watched.stdout
    assert "evil\\x1b]0;pwned\\x07node" in outputs[("nodes",)].stdout
    assert "\\x1b[2Jfield" in outputs[("submit", str(bad_spec))].stderr
    assert printable("tab\there\nnew", multiline=True) == "tab\there\nnew"
    assert printable("tab\there\nnew") == "tab\\x09here\\x0anew"
    assert printable("münchen \U0001f600") == "münchen \U0001f600"


def test_tenants_limits_and_pending_reasons(served: dict[str, Any]) -> None:
    assert cli(served, "keys", "create", "--tenant", "limited").returncode == 0
    shown = cli(served, "tenants", "set", "limited", "--max-queued", "5", "--max-running", "default")
    assert shown.returncode == 0, shown.stderr
    limits = json.loads(shown.stdout)
    assert limits["max_queued_jobs"] == 5 and limits["custom_limits"] == ["max_queued_jobs"]
    assert json.loads(cli(served, "tenants", "show", "limited").stdout)["max_queued_jobs"] == 5
    assert cli(served, "tenants", "show", "nobody").returncode == 1
    gpu_job = Path(served["data_dir"]) / "gpu-job.json"
    spec = json.loads((REPO / "examples" / "digits-mlp.json").read_text())
    gpu_job.write_text(json.dumps({**spec, "requirements": {"gpu": True}}))
    job_id = json.loads(cli(served, "submit", str(gpu_job)).stdout)["job_id"]
    assert json.loads(cli(served, "status", job_id).stdout)["pending_reason"] == "no_node_fits"
    line = next(row for row in cli(served, "jobs").stdout.splitlines() if row.startswith(job_id))
    assert "(no_node_fits)" in line
    cli(served, "cancel", job_id)
