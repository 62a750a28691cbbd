"""``python -m load_tests.memory`` measures a real training run against its memory estimate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_the_estimate_holds_for_the_example_job(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "load_tests.memory", "--only", "digits-mlp", "--steps", "3",
                          "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    [result] = [json.loads(path.read_text()) for path in tmp_path.glob("memory-*.json")]
    [row] = result["rows"]
    assert row["name"] == "digits-mlp" and row["measured_mb"] > 0 and 0 < row["ratio"] <= 1
    assert result["under_estimate"] == []
