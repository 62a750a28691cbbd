"""The benchmark harness: a tiny CPU run under the interpreter exercises every benchmark's code path
and writes its result files; without a GPU (and without --cpu-smoke) it exits 2 and writes nothing."""

import csv
import json
from pathlib import Path

import pytest
import torch

from kernels.benchmarks.__main__ import BENCHMARKS, NO_GPU_EXIT, main


# Dynamo, tracing torch.optim for the compiled-optimizer baseline, trips over a deprecation inside
# torch itself; the harness would record it as that variant's error.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cpu_smoke_run_writes_every_benchmark(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["meta"]["smoke"] is True
    for key in ("torch", "triton", "git_commit", "device", "time_utc"):
        assert report["meta"][key], key
    assert report["copy_bandwidth_gb_per_s"] > 0

    rows = report["results"]
    assert not [row for row in rows if "error" in row or "skipped" in row]
    seen = {(row["bench"], row["variant"]) for row in rows}
    for bench in BENCHMARKS:
        name = "transformer_step" if bench == "transformer" else bench
        assert {(name, "triton"), (name, "eager"), (name, "compile")} <= seen, name
    ours = [row for row in rows if row["variant"] == "triton"]
    assert all(row["median_ms"] > 0 and "speedup_vs_eager" in row for row in ours)
    assert {t["target"] for t in report["targets"]} >= {">= 85% of device-copy bandwidth", "faster than torch.compile",
                                                       "training step >= 1.2x eager samples/s"}
    with (tmp_path / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    assert "targets met" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_gpu_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "out")]) == NO_GPU_EXIT
    assert not (tmp_path / "out").exists()
    assert "no CUDA GPU" in capsys.readouterr().err
