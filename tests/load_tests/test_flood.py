"""CI smoke of the slow-body flood benchmark: a few connections for a few seconds against a local stack
it starts itself, with a small per-address cap so that the one-address phase meets it. No timing is
asserted: only that the run passes (the node stayed registered) and wrote its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_flood_smoke(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYXWIZ_")} | {
        "CYXWIZ_MAX_REQUESTS_PER_CLIENT": "10", "CYXWIZ_DATA_DIR": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-m", "load_tests.flood", "--connections", "30", "--duration", "2",
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout + done.stderr
    [path] = tmp_path.glob("flood-*.json")
    results = json.loads(path.read_text())
    assert results["node_registered"] is True and results["connections"] == 30
    assert results["edge"]["max_requests_per_client"] == 10 and results["machine"]["python"]
    phases = {phase["name"]: phase for phase in results["phases"]}
    assert list(phases) == ["baseline", "one_address", "many_addresses"]
    assert phases["many_addresses"]["sources"][-1] == "127.0.0.21"
    for phase in phases.values():
        beats = phase["heartbeats"]
        assert beats["count"] > 0 and beats["ok"] == beats["count"] and beats["p99_ms"] >= beats["p50_ms"] > 0
        assert phase["node_online_after"] is True and phase["p50_ratio_to_baseline"] is not None
    # one address over its cap of 10: the other 20 were refused at once, and never held
    one = phases["one_address"]["flood"]
    assert one["outcomes"]["503 overloaded"] >= 20
    assert "503 overloaded" not in phases["many_addresses"]["flood"]["outcomes"]  # 20 addresses, 10 each: room
