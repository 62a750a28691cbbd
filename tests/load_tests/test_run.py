"""CI smoke of the load runner: a ~10 s headless Locust run against a local stack it starts itself.

Locust runs in a subprocess (it monkey-patches the standard library with gevent), so nothing of it
is imported here. No timing is asserted: only that the run passes and wrote its statistics.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_run_smoke(tmp_path: Path) -> None:
    out = tmp_path / "load"
    done = subprocess.run([sys.executable, "-m", "load_tests.run", "--duration", "10", "--users", "10",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout + done.stderr + (out / "locust.log").read_text()
    for name in ("locust_stats.csv", "locust_failures.csv", "locust.json", "summary.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] > 0 and summary["failures"] == 0
    assert summary["machine"]["cpu_count"] and summary["machine"]["python"]
    with open(out / "locust_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert int(rows["Aggregated"]["Request Count"]) > 0
    # Both kinds of user did their part of the contract.
    assert int(rows["/v1/nodes"]["Request Count"]) > 0 and int(rows["/v1/jobs"]["Request Count"]) > 0
