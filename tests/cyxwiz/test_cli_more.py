"""Every client command of `cyxwiz` against a real `cyxwiz serve` (issue 12 part 4): tables and --json,
summaries, user mistakes as one line, submit from stdin with --set, --watch's exit code, keys, nodes
drain, logs, sample and redis-cli. Nodes are played over HTTP with their session tokens."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from cyxwiz.embedded import free_port
from tests.conftest import DIGITS_SPEC, REPO, bearer, model_weights
from tests.cyxwiz.conftest import assert_one_line_error, cli


def register_node(served: dict[str, Any], labels: dict[str, str] | None = None, slots: int = 1) -> dict[str, Any]:
    resp = httpx.post(f"{served['api_url']}/v1/nodes", headers=bearer(served["join_token"]),
                      json={"name": f"cli-{uuid.uuid4().hex[:8]}", "slots": slots, "labels": labels or {},
                            "capabilities": {"device": "cpu", "cpu_cores": 2, "ram_mb": 24000}})
    assert resp.status_code == 201, resp.text
    return resp.json()  # type: ignore[no-any-return]


def report(served: dict[str, Any], reg: dict[str, Any], job_id: str, **body: Any) -> None:
    resp = httpx.post(f"{served['api_url']}/v1/jobs/{job_id}/progress", headers=bearer(reg["session_token"]),
                      json={"attempt": 1, **body})
    assert resp.status_code == 200, resp.text


def submit_json(served: dict[str, Any], spec: dict[str, Any], *args: str) -> dict[str, Any]:
    out = cli(served, "submit", "-", "--json", *args, stdin=json.dumps(spec))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def unplaceable() -> dict[str, Any]:
    """A spec no node of this module fits (a label nobody has): it stays queued, no_node_fits."""
    return {**DIGITS_SPEC, "requirements": {"labels": {"nowhere": uuid.uuid4().hex[:8]}}}


def test_empty_cluster_says_so(served: dict[str, Any]) -> None:
    """First in this module: no node and no job yet. Empty is a sentence, not nothing."""
    assert cli(served, "nodes").stdout.startswith("no nodes (start one with `cyxwiz node`")
    assert cli(served, "jobs").stdout == "no jobs\n"
    filtered = cli(served, "jobs", "--status", "failed", "--tenant", "acme")
    assert filtered.stdout == "no jobs (status failed, tenant acme)\n"
    assert json.loads(cli(served, "nodes", "--json").stdout) == {"nodes": []}
    assert json.loads(cli(served, "jobs", "--json").stdout) == {"jobs": [], "next_cursor": None}


def test_version_and_help(served: dict[str, Any]) -> None:
    from cyxwiz.cli import build_parser, version

    out = cli(served, "--version")
    assert out.returncode == 0 and out.stdout == f"cyxwiz {version()}\n" and re.fullmatch(r"\d+\.\d+\.\d+.*", version())
    assert "(default: 8080)" in cli(served, "serve", "--help").stdout
    for command, shown in (("jobs", "--limit LIMIT jobs per page (1-500) (default: 50)"),
                           ("jobs", "--status {queued,assigned,running,completed,failed,cancelled} only jobs"),
                           ("download", "--name NAME the artifact to download (default: model.safetensors)"),
                           ("download", "-o OUTPUT, --output OUTPUT file to write (default: JOB.safetensors"),
                           ("serve", "--workers WORKERS gateway worker processes"),
                           ("serve", "--host HOST address the gateway and the embedded store listen on")):
        text = " ".join(cli(served, command, "--help").stdout.split())
        assert shown in text, (command, text)
    # every argument of the commands this CLI defines says what it is for (node, up and demo are the
    # node runtime's and cyxwiz/cluster.py's)
    missing = []

    def walk(parser: Any, path: str) -> None:
        for action in parser._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for name, child in action.choices.items():
                    if name not in ("node", "up", "demo"):
                        walk(child, f"{path} {name}")
            elif not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "cyxwiz")
    assert missing == []


def test_user_mistakes_are_one_line_without_traceback(served: dict[str, Any], tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"model": {"type": "mlp"},\n "dataset": "digits"\n "training": {}}')
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x80\xff\x00")
    assert_one_line_error(cli(served, "submit", str(tmp_path / "missing.json")), "no such file:", "missing.json")
    assert_one_line_error(cli(served, "submit", str(bad_json)), "bad.json is not valid JSON: Expecting ',' delimiter "
                                                                "at line 3, column 2")
    assert_one_line_error(cli(served, "submit", "-", stdin="{nope"), "standard input is not valid JSON")
    assert_one_line_error(cli(served, "submit", str(listed)), "must hold a JSON object")
    assert_one_line_error(cli(served, "submit", str(binary)), "is not UTF-8 text")
    assert_one_line_error(cli(served, "submit", str(tmp_path)), "is a directory")
    example = str(REPO / "examples" / "digits-mlp.json")
    assert_one_line_error(cli(served, "submit", example, "--set", "training.epochs"), "--set takes PATH=VALUE")
    assert_one_line_error(cli(served, "submit", example, "--set", "name.first=x"), "name is \"digits-mlp\", not an")
    assert_one_line_error(cli(served, "submit", example, "--set", "model.hidden.7=1"), "is a list of 2")
    assert_one_line_error(cli(served, "status", "xyz"), "'xyz' is not a job id (they look like j-0123456789abcdef0123)")
    assert_one_line_error(cli(served, "cancel", "j-0123456789abcdef0123", "j-x"), "'j-x' is not a job id")
    assert_one_line_error(cli(served, "logs", "J-0123456789ABCDEF0123"), "is not a job id")
    assert_one_line_error(cli(served, "nodes", "drain", "n-xyz"), "'n-xyz' is not a node id (they look like n-0123")
    assert_one_line_error(cli(served, "nodes", "drain"), "which node?")
    assert_one_line_error(cli(served, "keys", "revoke", "cwk_secret"), "is not a key id (they look like k-")
    assert_one_line_error(cli(served, "status", "j-0123456789abcdef0123"), "no job j-0123456789abcdef0123 (404 "
                                                                           "not_found)")
    closed = f"http://127.0.0.1:{free_port()}"
    assert_one_line_error(cli(served, "jobs", "--api", closed),
                          f"cyxwiz: cannot reach the API at {closed} (Connection refused): is `cyxwiz serve` "
                          "running there?")
    assert_one_line_error(cli(served, "jobs", "--api", "localhost:8080"), "is not an API URL")
    assert_one_line_error(cli(served, "jobs", "--api-key", "cwk_wrong"), "unknown API key (401 unauthorized): "
                                                                         "pass --api-key")
    assert_one_line_error(cli(served, "jobs", "--data-dir", str(tmp_path / "none")), "no API key")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "credentials.json").write_text("{")
    assert_one_line_error(cli(served, "jobs", "--data-dir", str(tmp_path / "broken")), "credentials.json is not "
                                                                                       "valid JSON")
    usage = cli(served, "jobs", "--status", "sleeping")  # argparse's own mistakes: usage and exit 2
    assert usage.returncode == 2 and "invalid choice: 'sleeping'" in usage.stderr and "Traceback" not in usage.stderr


def test_submit_from_stdin_with_overrides(served: dict[str, Any]) -> None:
    spec = json.loads((REPO / "examples" / "digits-mlp.json").read_text())
    answer = submit_json(served, {**spec, **unplaceable()}, "--set", "training.epochs=5", "--set", "name=from-stdin",
                         "--set", "model.hidden=[16, 8]", "--set", "model.hidden.1=4", "--set", "priority=high",
                         "--set", 'requirements.labels.zone="7"', "--set", "training.warmup_steps=3")
    job = json.loads(cli(served, "status", answer["job_id"], "--json").stdout)
    assert job["name"] == "from-stdin" and job["priority"] == "high"
    assert job["spec"]["training"]["epochs"] == 5 and job["spec"]["training"]["warmup_steps"] == 3
    assert job["spec"]["model"]["hidden"] == [16, 4]
    assert job["spec"]["requirements"]["labels"]["zone"] == "7"  # a JSON string stays a string
    quiet = cli(served, "submit", "-", "-q", "--set", "name=quiet", stdin=json.dumps(unplaceable()))
    assert re.fullmatch(r"j-[0-9a-f]{20}\n", quiet.stdout)
    cancelled = cli(served, "cancel", answer["job_id"], quiet.stdout.strip())
    assert cancelled.stdout == f"cancelled {answer['job_id']}\ncancelled {quiet.stdout.strip()}\n"
    again = cli(served, "cancel", answer["job_id"], quiet.stdout.strip(), "--json")
    assert again.returncode == 1 and json.loads(again.stdout) == []
    assert again.stderr == "".join(f"cyxwiz: cannot cancel {job_id}: job {job_id} is already cancelled (409 "
                                   "job_terminal)\n" for job_id in (answer["job_id"], quiet.stdout.strip()))


def _watch(served: dict[str, Any], spec: dict[str, Any]) -> tuple[subprocess.Popen[str], str, list[str]]:
    """``cyxwiz submit - --watch`` running; its job id and its first two lines of output."""
    proc = subprocess.Popen([sys.executable, "-m", "cyxwiz.cli", "submit", "-", "--watch"], env=served["env"],
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    lines = [proc.stdout.readline(), proc.stdout.readline()]
    return proc, lines[0].split()[2].rstrip(":"), lines


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()


def _rest(proc: subprocess.Popen[str]) -> str:
    """What the watching process prints until it exits."""
    assert proc.stdout is not None
    rest = proc.stdout.read()
    proc.wait(60)
    return rest


def test_submit_watch_exit_codes(served: dict[str, Any]) -> None:
    """--watch shows why a queued job waits, ends with the reason it did not complete and exit 1 (0 only
    for completed): a job cancelled while watched, a job failed by its own fault, a completed one."""
    proc, job_id, lines = _watch(served, unplaceable())
    try:
        assert "queued (no_node_fits: no live node can ever hold it" in lines[0]
        assert "; it needs labels nowhere=" in lines[0]
        assert "queued (no_node_fits)" in lines[1]  # the progress line, while it waits
        httpx.post(f"{served['api_url']}/v1/jobs/{job_id}/cancel", headers=bearer(served["api_key"]))
        rest = _rest(proc)
    finally:
        _stop(proc)
    assert proc.returncode == 1 and rest.rstrip().endswith(f"job {job_id} was cancelled"), rest

    labels = {"watch": uuid.uuid4().hex[:8]}
    reg = register_node(served, labels)
    spec = {**DIGITS_SPEC, "requirements": {"labels": labels}}
    proc, job_id, lines = _watch(served, spec)
    try:
        assert lines[0].startswith(f"submitted job {job_id}: assigned to node {reg['node_id']}")
        report(served, reg, job_id, seq=1, status="failed", error="loss is NaN at step 3", fault="job")
        rest = _rest(proc)
    finally:
        _stop(proc)
    assert proc.returncode == 1 and rest.rstrip().endswith(f"job {job_id} failed: loss is NaN at step 3")

    proc, job_id, _ = _watch(served, spec)
    try:
        uploaded = httpx.put(f"{served['api_url']}/v1/jobs/{job_id}/artifacts/model.safetensors",
                             content=model_weights(spec), headers={**bearer(reg["session_token"]),
                                                                   "X-CyxWiz-Attempt": "1"})
        assert uploaded.status_code == 201, uploaded.text
        report(served, reg, job_id, seq=1, status="completed", epoch=1, step=10, total_steps=10,
               metrics={"loss": 0.25, "val_accuracy": 0.96}, artifacts=["model.safetensors"])
        rest = _rest(proc)
    finally:
        _stop(proc)
    assert proc.returncode == 0, rest
    assert f"job {job_id} completed: loss 0.2500  val_accuracy 0.9600" in rest
    assert f"weights: cyxwiz download {job_id}" in rest


def test_status_summary_and_jobs_table(served: dict[str, Any]) -> None:
    import redis

    labels = {"summary": uuid.uuid4().hex[:8]}
    reg = register_node(served, labels)
    job_id = submit_json(served, {**DIGITS_SPEC, "requirements": {"labels": labels}})["job_id"]
    report(served, reg, job_id, seq=1, status="running", epoch=1, step=30, total_steps=120,
           metrics={"loss": 0.5, "accuracy": 0.75, "samples_per_s": 1200.0})
    store = redis.Redis.from_url(served["redis_url"], decode_responses=True)  # an audit's verdict, as recorded
    store.hset(f"cyxwiz:job:{job_id}", mapping={"verify_status": "passed", "verify_segment": "[2, 3]",
                                                "verify_verifier": "n-00000000000000aa", "verify_distance": "0.0004"})
    store.close()
    name = json.loads(cli(served, "nodes", "--json").stdout)
    node_name = next(n["name"] for n in name["nodes"] if n["node_id"] == reg["node_id"])
    summary = cli(served, "status", job_id).stdout.splitlines()
    fields = {line[:13].strip(): line[14:] for line in summary}
    assert fields["status"] == "running"
    assert fields["node"] == f"{reg['node_id']} ({node_name})"
    assert fields["attempt"] == f"1 of 3: 1 on {reg['node_id']} ({node_name})"
    assert fields["progress"] == "25.0%  step 30/120  epoch 1/10"
    assert fields["metrics"] == "loss 0.5000  accuracy 0.7500  samples_per_s 1200.0000"
    assert fields["verification"] == "passed  segment 2-3  verifier n-00000000000000aa  distance 0.0004"
    assert fields["times"].startswith("created 20")
    full = json.loads(cli(served, "status", job_id, "--json").stdout)
    assert full["verification"]["status"] == "passed" and full["attempts"][0]["node_id"] == reg["node_id"]
    row = next(line for line in cli(served, "jobs").stdout.splitlines() if line.startswith(job_id)).split()
    assert row == [job_id, "digits-mlp", "running", reg["node_id"], "25%", "e1/10", "-", "passed"]
    table = cli(served, "nodes").stdout.splitlines()
    assert table[0].split() == ["NODE", "NAME", "STATUS", "JOBS", "SCORE", "DEVICE", "TRUST", "AUDITS"]
    node_row = next(line for line in table if line.startswith(reg["node_id"]))
    assert f"{node_name}  online" in node_row and " 1/1 " in node_row and "0 passed, 0 failed" in node_row
    assert ("trusted" in node_row) != ("probation" in node_row)
    cli(served, "cancel", job_id)


def test_jobs_filters_pages_and_tenants(served: dict[str, Any]) -> None:
    made = json.loads(cli(served, "keys", "create", "--tenant", "quiet-tenant", "--json").stdout)
    other = json.loads(cli(served, "keys", "create", "--tenant", "busy-tenant", "--json").stdout)
    assert cli(served, "jobs", "--api-key", made["api_key"]).stdout == "no jobs\n"  # an empty tenant says so
    ids = [submit_json(served, unplaceable(), "--api-key", other["api_key"])["job_id"] for _ in range(3)]
    admins = submit_json(served, unplaceable())["job_id"]
    rows = cli(served, "jobs", "--tenant", "busy-tenant").stdout.splitlines()
    assert [row.split()[0] for row in rows[1:]] == ids[::-1] and "TENANT" not in rows[0]
    page = cli(served, "jobs", "--tenant", "busy-tenant", "--limit", "2").stdout.splitlines()
    assert len(page) == 4 and page[3].startswith("more: cyxwiz jobs --cursor ")
    assert page[3].endswith("--tenant busy-tenant")
    rest = cli(served, "jobs", *page[3].split()[3:5], "--tenant", "busy-tenant").stdout.splitlines()
    assert [row.split()[0] for row in rest[1:]] == [ids[0]]
    both = cli(served, "jobs", "--status", "queued").stdout.splitlines()
    assert both[0].split()[:2] == ["JOB", "TENANT"]  # jobs of several tenants: whose is each
    own = cli(served, "jobs", "--api-key", other["api_key"], "--json")
    assert [job["job_id"] for job in json.loads(own.stdout)["jobs"]] == ids[::-1]
    assert_one_line_error(cli(served, "jobs", "--api-key", other["api_key"], "--tenant", "quiet-tenant"),
                          "(403 forbidden)")
    assert cli(served, "cancel", *ids, admins).returncode == 0


def test_keys_create_list_revoke(served: dict[str, Any]) -> None:
    created = cli(served, "keys", "create", "--tenant", "keyed")
    lines = {line[:8].strip(): line[9:] for line in created.stdout.splitlines()}  # "api key  cwk_..."
    key, key_id = lines["api key"], lines["key id"]
    assert key.startswith("cwk_") and re.fullmatch(r"k-[0-9a-f]{16}", key_id) and lines["tenant"] == "keyed"
    assert "never shown again" in created.stderr
    listed = cli(served, "keys", "list")
    assert listed.stdout.splitlines()[0].split() == ["KEY", "ID", "TENANT", "ADMIN", "CREATED"]
    assert any(line.split()[:3] == [key_id, "keyed", "no"] for line in listed.stdout.splitlines())
    assert key not in listed.stdout and served["api_key"] not in listed.stdout
    keys = json.loads(cli(served, "keys", "list", "--json").stdout)["keys"]
    admin_id = next(k["key_id"] for k in keys if k["admin"])
    assert cli(served, "jobs", "--api-key", key).returncode == 0
    assert_one_line_error(cli(served, "keys", "list", "--api-key", key), "(403 forbidden)")
    assert_one_line_error(cli(served, "keys", "revoke", admin_id), "is the key making this request", "409 own_key")
    assert_one_line_error(cli(served, "keys", "revoke", "k-0123456789abcdef"), "(404 not_found)")
    revoked = cli(served, "keys", "revoke", key_id)
    assert revoked.returncode == 0 and revoked.stdout.startswith(f"revoked {key_id} (tenant keyed)")
    assert_one_line_error(cli(served, "jobs", "--api-key", key), "unknown API key (401 unauthorized)")
    assert key_id not in cli(served, "keys", "list").stdout


def test_nodes_drain(served: dict[str, Any]) -> None:
    idle = register_node(served)
    busy = register_node(served, {"drain": "busy"})
    job_id = submit_json(served, {**DIGITS_SPEC, "requirements": {"labels": {"drain": "busy"}}})["job_id"]
    user = json.loads(cli(served, "keys", "create", "--tenant", "drainer", "--json").stdout)["api_key"]
    assert_one_line_error(cli(served, "nodes", "drain", idle["node_id"], "--api-key", user), "(403 forbidden)")
    out = cli(served, "nodes", "drain", idle["node_id"])
    assert out.returncode == 0 and out.stdout == f"node {idle['node_id']} removed (it had no jobs)\n"
    out = cli(served, "nodes", "drain", busy["node_id"])
    assert out.stdout.startswith(f"node {busy['node_id']} is draining: it takes no new jobs")
    listing = cli(served, "nodes", "list").stdout
    assert idle["node_id"] not in listing
    assert next(line for line in listing.splitlines() if line.startswith(busy["node_id"])).split()[2] == "draining"
    assert_one_line_error(cli(served, "nodes", busy["node_id"]), "to drain one: cyxwiz nodes drain")
    cli(served, "cancel", job_id)


def test_logs(served: dict[str, Any]) -> None:
    labels = {"logs": uuid.uuid4().hex[:8]}
    reg = register_node(served, labels)
    job_id = submit_json(served, {**DIGITS_SPEC, "requirements": {"labels": labels}})["job_id"]
    assert cli(served, "logs", job_id).stdout == "no logs yet\n"
    assert json.loads(cli(served, "logs", job_id, "--json").stdout)["lines"] == []
    assert_one_line_error(cli(served, "logs", "j-0123456789abcdef0123"), "no job j-0123456789abcdef0123 (404")
    assert_one_line_error(cli(served, "logs", job_id, "-f", "--json"), "--json and -f do not go together")
    sent = [{"time": f"2026-12-02T15:36:4{i}.000Z", "line": text}
            for i, text in enumerate(["INFO cyxwiz.train: epoch 1/2", "progress \x1b[2K50%", "INFO done"])]
    resp = httpx.post(f"{served['api_url']}/v1/jobs/{job_id}/logs", headers=bearer(reg["session_token"]),
                      json={"attempt": 1, "lines": sent})
    if resp.status_code == 404:
        pytest.skip("the logs endpoint is not there yet")
    assert resp.status_code == 200, resp.text
    text = cli(served, "logs", job_id).stdout.splitlines()
    assert text[0] == "2026-12-02T15:36:40.000Z INFO cyxwiz.train: epoch 1/2"
    assert "\x1b" not in "".join(text) and "\\x1b[2K50%" in text[1]
    assert cli(served, "logs", job_id, "--tail", "1").stdout == "2026-12-02T15:36:42.000Z INFO done\n"
    as_json = json.loads(cli(served, "logs", job_id, "--json", "--attempt", "1").stdout)
    assert as_json["attempt"] == 1 and [line["line"] for line in as_json["lines"]][::2] == ["INFO cyxwiz.train: "
                                                                                            "epoch 1/2", "INFO done"]
    report(served, reg, job_id, seq=1, status="failed", error="bad data", fault="job")
    followed = cli(served, "logs", job_id, "-f")  # the job has ended: the stream ends after its lines
    assert followed.returncode == 0 and followed.stdout.splitlines()[:3] == text
    assert_one_line_error(cli(served, "logs", job_id, "--attempt", "9"), "(422 invalid_field, field attempt)")


def test_sample(served: dict[str, Any]) -> None:
    pytest.importorskip("torch")
    from shared.jobspec import parse_job_spec
    from shared.safetensors_check import placeholder_weights

    labels = {"sample": uuid.uuid4().hex[:8]}
    reg = register_node(served, labels, slots=2)
    text_spec = {"model": {"type": "transformer", "d_model": 32, "n_layers": 1, "n_heads": 2, "context": 32},
                 "dataset": {"name": "tiny-text"}, "training": {"epochs": 1}, "requirements": {"labels": labels}}
    digits_spec = {**DIGITS_SPEC, "requirements": {"labels": labels}}
    lm, mlp = (submit_json(served, spec)["job_id"] for spec in (text_spec, digits_spec))
    assert_one_line_error(cli(served, "sample", lm, "--prompt", "ROMEO:"),
                          f"job {lm} has no model yet (it is assigned)")
    assert_one_line_error(cli(served, "sample", "j-0123456789abcdef0123", "--prompt", "x"), "(404 not_found)")
    for job_id, spec in ((lm, text_spec), (mlp, digits_spec)):
        weights = placeholder_weights(parse_job_spec(spec))
        uploaded = httpx.put(f"{served['api_url']}/v1/jobs/{job_id}/artifacts/model.safetensors", content=weights,
                             headers={**bearer(reg["session_token"]), "X-CyxWiz-Attempt": "1"})
        assert uploaded.status_code == 201, uploaded.text
        report(served, reg, job_id, seq=1, status="completed", artifacts=["model.safetensors"])
    out = cli(served, "sample", lm, "--prompt", "ROMEO:", "--tokens", "12", "--seed", "3")
    assert out.returncode == 0 and out.stdout.startswith("ROMEO:"), out.stderr
    assert_one_line_error(cli(served, "sample", mlp, "--prompt", "x"), f"cannot sample from job {mlp}: not a "
                                                                        "language model")


def test_redis_cli_prints_as_redis_cli_does(served: dict[str, Any]) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return cli(served, "redis-cli", *args)

    assert run("SET", "t:s", 'say "hi"\n\x01é').stdout == "OK\n"
    assert run("GET", "t:s").stdout == '"say \\"hi\\"\\n\\x01\\xc3\\xa9"\n'
    assert run("INCRBY", "t:n", "5").stdout == "(integer) 5\n"
    assert run("GET", "t:missing").stdout == "(nil)\n"
    assert run("LRANGE", "t:missing", "0", "-1").stdout == "(empty array)\n"
    run("RPUSH", "t:list", *[str(i) for i in range(11)])
    listed = run("LRANGE", "t:list", "0", "-1").stdout.splitlines()
    assert listed[0] == ' 1) "0"' and listed[10] == '11) "10"'
    run("XADD", "t:stream", "1-1", "a", "1", "b", "2")
    assert run("XRANGE", "t:stream", "-", "+").stdout == ('1) 1) "1-1"\n   2) 1) "a"\n      2) "1"\n'
                                                          '      3) "b"\n      4) "2"\n')
    wrong = run("HGETALL", "t:s")
    assert wrong.returncode == 1 and wrong.stdout == ("(error) WRONGTYPE Operation against a key holding the wrong "
                                                      "kind of value\n")
    unknown = run("NOSUCHCOMMAND", "x")
    assert unknown.returncode == 1 and unknown.stdout.startswith("(error) ERR unknown command")
    assert_one_line_error(run(), "give a command")
    assert_one_line_error(run("--redis-url", "redis://127.0.0.1:1/0", "PING"), "cannot reach the store")
    redis_cli = shutil.which("redis-cli") or shutil.which("valkey-cli")
    if redis_cli:  # the real one, made to print as on a terminal, agrees byte for byte
        for args in (("GET", "t:s"), ("XRANGE", "t:stream", "-", "+"), ("LRANGE", "t:list", "0", "-1"),
                     ("INCRBY", "t:n", "0"), ("GET", "t:missing"), ("HGETALL", "t:s"), ("SET", "t:x", "y")):
            real = subprocess.run([redis_cli, "--no-auth-warning", "-u", served["redis_url"], "--no-raw", *args],
                                  capture_output=True, text=True, timeout=30)
            assert run(*args).stdout == real.stdout, args


def test_redis_keys_doc_examples_work_with_cyxwiz_redis_cli(served: dict[str, Any],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """docs/redis-keys.md's commands, pasted after `cyxwiz redis-cli` instead of `redis-cli -u "$REDIS_URL"`."""
    from cyxwiz.cli import main

    doc = (REPO / "docs" / "redis-keys.md").read_text()
    assert "`cyxwiz redis-cli HGETALL cyxwiz:nodes:by_name`" in doc
    commands = [shlex.split(line.split('"$REDIS_URL"', 1)[1]) for line in doc.splitlines()
                if line.startswith('redis-cli -u "$REDIS_URL" ')]
    assert len(commands) > 20
    for command in commands:  # in this process: forty interpreters would take half a minute
        code = main(["redis-cli", "--data-dir", served["data_dir"], *command])
        out, err = capsys.readouterr()
        assert err == "", (command, err)
        # a stream's group exists once a node reads it; the example ids name nothing here
        assert code == 0 or out.startswith("(error) NOGROUP"), (command, out)


def test_first_run_setup_says_what_it_does(tmp_path: Path) -> None:
    """scripts/_venv.sh: one line on stderr before creating the venv, one before installing, nothing once
    the venv is up to date. A stand-in interpreter records the steps instead of running pip."""
    for path in ("scripts/_venv.sh", "pyproject.toml", "constraints/cpu.txt"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / path, tmp_path / path)
    fake = tmp_path / "fake-python"
    fake.write_text('#!/bin/sh\n# "python -m venv .venv": make a venv whose python records its arguments\n'
                    'mkdir -p .venv/bin\nprintf \'#!/bin/sh\\necho "$@" >> .venv/calls\\n\' > .venv/bin/python\n'
                    "chmod +x .venv/bin/python\n")
    fake.chmod(0o755)

    def source() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", f"source {tmp_path}/scripts/_venv.sh"], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake)}, timeout=60)

    first = source()
    assert first.returncode == 0, first.stderr
    assert first.stderr.splitlines()[0] == ("scripts: first run: creating .venv and installing CyxWiz and CPU torch "
                                            "(a few minutes)")
    assert first.stderr.splitlines()[1].startswith("scripts: installing CyxWiz") and first.stdout == ""
    assert "pip install" in (tmp_path / ".venv" / "calls").read_text().replace("-m pip", "pip")
    again = source()
    assert again.returncode == 0 and again.stderr == "" and again.stdout == ""
