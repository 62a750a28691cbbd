"""A tenant's job that outgrows what it declared fails as the job's fault, on a real node runtime,
and the node's reputation does not move: its memory estimate, its wall-clock limit, a dataset that
inflates past the node's cap."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from shared import keys
from tests.conftest import DIGITS_SPEC
from tests.node_runtime.node_harness import Api, NodeProcess, long_digits

pytestmark = pytest.mark.timeout(120)


def _reputation(api: Api) -> float:
    [node] = api.wait_nodes(1)
    return float(node["reputation"])


def _fails_as_the_jobs_fault(api: Api, spec: dict[str, Any], reputation: float) -> dict[str, Any]:
    job = api.wait_status(api.submit(spec), ("completed", "failed"), 90)
    assert job["status"] == "failed" and job["attempt"] == 1, job  # final at once: not retried elsewhere
    assert _reputation(api) == reputation
    return job


def test_a_job_past_its_memory_estimate_is_killed_as_its_fault(api: Api, start_node: Callable[..., NodeProcess],
                                                               r: redis.Redis) -> None:
    job_id = api.submit({**DIGITS_SPEC, "max_attempts": 3})  # no node yet: it waits
    r.hset(keys.job_key(job_id), "memory_mb", 50)  # a job that will outgrow what it declared
    node = start_node(extra_env={"CYXWIZ_NODE_JOB_BASE_MEMORY_MB": "1"})
    reputation = _reputation(api)
    job = api.wait_status(job_id, ("completed", "failed"), 90)
    assert job["status"] == "failed" and job["attempt"] == 1, job
    assert "more than its estimate allows" in job["error"], job["error"]
    assert _reputation(api) == reputation
    assert node.alive()


def test_a_job_past_its_wall_clock_limit_fails(api: Api, start_node: Callable[..., NodeProcess]) -> None:
    node = start_node()
    reputation = _reputation(api)
    spec = long_digits(name="overrun")
    spec["training"]["max_duration_s"] = 3
    job = _fails_as_the_jobs_fault(api, spec, reputation)
    assert "max_duration_s" in job["error"], job["error"]
    good = api.wait_status(api.submit(DIGITS_SPEC), ("completed", "failed"), 90)  # the slot is free again
    assert good["status"] == "completed", good["error"]
    assert node.alive()


def test_a_dataset_that_inflates_past_the_cap_fails_as_the_jobs_fault(
        api: Api, start_node: Callable[..., NodeProcess], tmp_path: Path) -> None:
    data_root = tmp_path / "data-root"
    data_root.mkdir()
    row = b"0,0,0,0,0,0,0,1\n"
    with gzip.open(data_root / "bomb.csv.gz", "wb", compresslevel=9) as bomb:  # 64 MiB from about 100 kB
        for _ in range(64):
            bomb.write(row * ((1 << 20) // len(row)))
    assert (data_root / "bomb.csv.gz").stat().st_size < 1 << 20
    node = start_node(extra_args=["--data-root", str(data_root)], extra_env={"CYXWIZ_NODE_MAX_DATASET_MB": "8"})
    reputation = _reputation(api)
    spec = {**DIGITS_SPEC, "name": "gzip-bomb", "dataset": {"url": "bomb.csv.gz"}, "max_attempts": 3}
    job = _fails_as_the_jobs_fault(api, spec, reputation)
    assert "8 MiB" in job["error"], job["error"]
    assert node.alive()
