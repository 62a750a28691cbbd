"""The `cyxwiz` client commands against a real `cyxwiz serve`, configured only by its credentials file.
More of them (every command's output, user mistakes, keys, redis-cli) in test_cli_more.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import REPO, bearer, model_weights
from tests.cyxwiz.conftest import assert_one_line_error, cli


def test_credentials_file(served: dict[str, Any]) -> None:
    path = Path(served["data_dir"]) / "credentials.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert {"api_url", "api_key", "join_token", "redis_url"} <= set(served)
    listed = json.loads(cli(served, "keys", "list", "--json").stdout)["keys"]  # the admin key has its id
    assert [(k["key_id"], k["tenant"], k["admin"]) for k in listed] == [(served["api_key_id"], "admin", True)]


def test_submit_status_jobs_cancel_watch(served: dict[str, Any]) -> None:
    out = cli(served, "submit", str(REPO / "examples" / "digits-mlp.json"))
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    job_id = first.split()[2].rstrip(":")
    assert first.startswith(f"submitted job {job_id}: queued (no_node_fits: ")  # no node yet: it says why it waits
    assert f"cyxwiz watch {job_id}" in out.stdout
    status = json.loads(cli(served, "status", job_id, "--json").stdout)
    assert status["status"] == "queued" and status["spec"]["model"]["hidden"] == [128, 64]
    summary = cli(served, "status", job_id).stdout
    assert summary.startswith(f"job           {job_id}  digits-mlp") and "status        queued: no_node_fits" in summary
    assert len(summary.splitlines()) < 10  # a summary, not the object
    table = cli(served, "jobs").stdout.splitlines()
    assert table[0].split() == ["JOB", "NAME", "STATUS", "NODE", "PROGRESS", "PENDING", "VERIFIED"]
    assert any(row.startswith(job_id) for row in table[1:])
    cancelled = cli(served, "cancel", job_id)
    assert cancelled.returncode == 0 and cancelled.stdout == f"cancelled {job_id}\n"
    watched = cli(served, "watch", job_id)
    assert watched.returncode == 1 and f"job {job_id} was cancelled" in watched.stdout  # ended, not completed
    again = cli(served, "cancel", job_id)
    assert again.returncode == 1 and "job_terminal" in again.stderr and "Traceback" not in again.stderr


def test_keys_nodes_download(served: dict[str, Any], tmp_path: Path) -> None:
    created = cli(served, "keys", "create", "--tenant", "acme", "--json")
    assert created.returncode == 0 and json.loads(created.stdout)["tenant"] == "acme"
    api = served["api_url"]
    reg = httpx.post(f"{api}/v1/nodes", json={"name": "cli-node"}, headers=bearer(served["join_token"])).json()
    assert "cli-node" in cli(served, "nodes").stdout
    job_id = cli(served, "submit", str(REPO / "examples" / "digits-mlp.json"), "--quiet").stdout.strip()
    weights = model_weights()
    httpx.put(f"{api}/v1/jobs/{job_id}/artifacts/model.safetensors", content=weights,
              headers=bearer(reg["session_token"]))
    target = tmp_path / "w.safetensors"
    assert cli(served, "download", job_id, "-o", str(target)).returncode == 0
    assert target.read_bytes() == weights


def test_bad_input_is_reported(served: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"type": "mlp"}, "dataset": {"name": "digits"}, "training": {"epochs": 0}}')
    out = cli(served, "submit", str(bad))
    assert_one_line_error(out, "(422 invalid_field, field training.epochs)")
    assert_one_line_error(cli(served, "status", "j-nope"), "'j-nope' is not a job id (they look like j-0123")


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
    outputs = {args: cli(served, *args) for args in (("status", job_id), ("status", job_id, "--json"), ("jobs",),
                                                      ("watch", job_id), ("nodes",), ("nodes", "--json"),
                                                      ("submit", str(bad_spec)))}
    for args, out in outputs.items():
        assert not any(c in out.stdout + out.stderr for c in raw), (args, out.stdout, out.stderr)
    assert json.loads(outputs[("status", job_id, "--json")].stdout)["error"] == error  # still the exact JSON
    assert "boom \\x1b[31mred" in outputs[("status", job_id)].stdout
    watched = outputs[("watch", job_id)]
    assert "boom \\x1b[31mred\\x1b[0m\\x0d\nTraceback line 2\\x7f\\x9b2J\\u202e" in watched.stdout
    assert "evil\\x1b]0;pwned\\x07node" in outputs[("nodes",)].stdout
    assert "\\x1b[2Jfield" in outputs[("submit", str(bad_spec))].stderr
    assert printable("tab\there\nnew", multiline=True) == "tab\there\nnew"
    assert printable("tab\there\nnew") == "tab\\x09here\\x0anew"
    assert printable("münchen \U0001f600") == "münchen \U0001f600"


def test_tenants_limits_and_pending_reasons(served: dict[str, Any]) -> None:
    assert cli(served, "keys", "create", "--tenant", "limited").returncode == 0
    shown = cli(served, "tenants", "set", "limited", "--max-queued", "5", "--max-running", "default", "--json")
    assert shown.returncode == 0, shown.stderr
    limits = json.loads(shown.stdout)
    assert limits["max_queued_jobs"] == 5 and limits["custom_limits"] == ["max_queued_jobs"]
    assert json.loads(cli(served, "tenants", "show", "limited", "--json").stdout)["max_queued_jobs"] == 5
    human = cli(served, "tenants", "show", "limited").stdout.splitlines()
    assert human[0] == "tenant limited" and human[1].split() == ["queued", "0", "of", "at", "most", "5", "(its", "own)"]
    assert "(the default)" in human[2]
    assert_one_line_error(cli(served, "tenants", "show", "nobody"), "(404 not_found)")
    assert_one_line_error(cli(served, "tenants", "set", "limited", "--max-queued", "lots"), "--max-queued takes")
    gpu_job = Path(served["data_dir"]) / "gpu-job.json"
    spec = json.loads((REPO / "examples" / "digits-mlp.json").read_text())
    gpu_job.write_text(json.dumps({**spec, "requirements": {"gpu": True}}))
    submitted = cli(served, "submit", str(gpu_job)).stdout  # a GPU job and no GPU node: it says so at once
    job_id = submitted.split()[2].rstrip(":")
    assert "queued (no_node_fits: no live node can ever hold it" in submitted
    assert "registers; it needs a GPU)" in submitted
    assert json.loads(cli(served, "status", job_id, "--json").stdout)["pending_reason"] == "no_node_fits"
    assert "status        queued: no_node_fits" in cli(served, "status", job_id).stdout
    line = next(row for row in cli(served, "jobs").stdout.splitlines() if row.startswith(job_id))
    assert line.split()[2:4] == ["queued", "-"] and "no_node_fits" in line.split()
    cli(served, "cancel", job_id)
