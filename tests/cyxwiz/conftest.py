"""A real ``cyxwiz serve`` for the CLI tests (one per test module), and a way to run the CLI as a user
does: a separate process configured only by the server's credentials file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cyxwiz.embedded import free_port
from cyxwiz.server import wait_healthy
from tests.conftest import REPO


@pytest.fixture(scope="module")
def served() -> Iterator[dict[str, Any]]:
    data_dir = tempfile.mkdtemp(prefix="cyxwiz-cli-")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYXWIZ_")} | {"CYXWIZ_DATA_DIR": data_dir}
    # audits are tested on their own (tests/node_runtime/test_verification.py): here a completed result
    # would wait for a replay by another node that these tests only play
    env |= {"CYXWIZ_PROBATION_AUDITS": "0", "CYXWIZ_AUDIT_FRACTION": "0"}
    server = subprocess.Popen([sys.executable, "-m", "cyxwiz.cli", "serve", "--port", str(port), "--workers", "2"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_healthy(f"http://127.0.0.1:{port}", 30)
    creds = json.loads((Path(data_dir) / "credentials.json").read_text())
    yield {**creds, "data_dir": data_dir, "env": env}
    server.terminate()
    assert server.wait(30) == 0


def cli(served: dict[str, Any], *args: str, stdin: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cyxwiz ARGS`` against the served cluster and wait for it."""
    return subprocess.run([sys.executable, "-m", "cyxwiz.cli", *args], env={**served["env"], **(env or {})},
                          cwd=REPO, capture_output=True, text=True, timeout=60, input=stdin)


def assert_one_line_error(out: subprocess.CompletedProcess[str], *phrases: str) -> str:
    """A user mistake: exit 1, nothing on stdout, one ``cyxwiz: ...`` line on stderr naming ``phrases``,
    and no traceback."""
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and out.stdout == "", (out.stdout, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cyxwiz: "), out.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]
