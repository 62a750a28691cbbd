"""The curl walk-through in docs/api.md works as written, against a real `cyxwiz serve`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from cyxwiz.embedded import free_port
from cyxwiz.server import wait_healthy

REPO = Path(__file__).resolve().parents[1]


def walkthrough() -> str:
    text = (REPO / "docs" / "api.md").read_text()
    section = text[text.index("## Walk-through with curl"):]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match
    return match.group(1)


def test_curl_walkthrough_runs_as_written() -> None:
    data_dir = tempfile.mkdtemp(prefix="cyxwiz-docs-")
    port = free_port()
    env = {**os.environ, "CYXWIZ_DATA_DIR": data_dir}
    env.pop("CYXWIZ_REDIS_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "cyxwiz.cli", "serve", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}", 30)
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", walkthrough()], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "artifact round trip ok" in result.stdout
        assert '"status":"assigned"' in result.stdout.replace(" ", "")
        assert "pretend " in result.stdout  # the 8-byte Range
        assert '"status":"completed"' in result.stdout and '"artifacts":["model.safetensors"]' in result.stdout
        assert oct(os.stat(Path(data_dir) / "credentials.json").st_mode & 0o777) == "0o600"
    finally:
        server.terminate()
        assert server.wait(30) == 0  # a clean shutdown
