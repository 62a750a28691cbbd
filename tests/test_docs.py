"""The curl walk-through in docs/api.md works as written, against a real `cyxwiz serve`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

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
    # the venv active, as the walk-through says
    env = {**os.environ, "CYXWIZ_DATA_DIR": data_dir, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
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
        assert "{ 206" in result.stdout  # the 1-byte Range
        assert '"status":"completed"' in result.stdout and '"artifacts":["model.safetensors"]' in result.stdout
        assert oct(os.stat(Path(data_dir) / "credentials.json").st_mode & 0o777) == "0o600"
    finally:
        server.terminate()
        assert server.wait(30) == 0  # a clean shutdown


def redis_cli_examples() -> tuple[str, list[str]]:
    """docs/redis-keys.md: the line that sets REDIS_URL, and the redis-cli examples that name no id."""
    text = (REPO / "docs" / "redis-keys.md").read_text()
    section = text[text.index("## Inspecting state with redis-cli"):]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    commands = [line for line in blocks[1].splitlines()
                if line.startswith("redis-cli") and not re.search(r"[nj]-[0-9a-f]{16}", line)]
    return blocks[0].strip(), commands


def test_redis_cli_examples_work_as_pasted() -> None:
    """The REDIS_URL line finds the admin URL in $CYXWIZ_DATA_DIR; the examples run with it (as the
    store needs credentials), with redis-cli when there is one."""
    set_url, commands = redis_cli_examples()
    assert len(commands) >= 8 and all('-u "$REDIS_URL"' in c for c in commands)
    data_dir = tempfile.mkdtemp(prefix="cyxwiz-docs-")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYXWIZ_")} | {
        "CYXWIZ_DATA_DIR": data_dir, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the venv's
    server = subprocess.Popen([sys.executable, "-m", "cyxwiz.cli", "serve", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}", 30)
        probe = ('python3 -c "import redis, os; print(redis.Redis.from_url(os.environ[\'REDIS_URL\']).acl_whoami())"')
        script = f"{set_url}\nexport REDIS_URL\n{probe}\n"
        cli = shutil.which("redis-cli")
        if cli:
            script += "\n".join(c.replace("redis-cli", "redis-cli --no-auth-warning", 1) for c in commands) + "\n"
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == "cyxwiz-admin"
        if not cli:
            pytest.skip("the REDIS_URL line works; redis-cli is not installed (Debian: redis-tools) to run the rest")
        assert "NOPERM" not in result.stdout and "NOAUTH" not in result.stdout
        assert "user cyxwiz-gateway" in result.stdout  # ACL LIST
    finally:
        server.terminate()
        assert server.wait(30) == 0
