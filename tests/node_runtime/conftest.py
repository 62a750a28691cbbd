"""Fixtures of the node runtime tests: node runtime processes that are always stopped afterwards,
and the user's API client. The session's Valkey and gateway come from tests/conftest.py."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import start_gateway
from tests.node_runtime.node_harness import Api, NodeProcess


@pytest.fixture()
def api(http: httpx.Client, creds: dict[str, str]) -> Api:
    return Api(http, creds["api_key"])


@pytest.fixture()
def start_node(api_url: str, creds: dict[str, str], tmp_path: Path,
               request: pytest.FixtureRequest) -> Iterator[Callable[..., NodeProcess]]:
    """Start node runtimes (``start_node(slots=2, name=...)``); all are stopped after the test, and
    their logs are printed when it fails."""
    started: list[NodeProcess] = []

    def start(**kwargs: Any) -> NodeProcess:
        index = len(started) + 1
        kwargs.setdefault("name", f"test-node-{index}")
        # the test's own data dir: a restarted runtime finds its identity there, and ~/.cyxwiz stays untouched
        kwargs["extra_env"] = {"CYXWIZ_DATA_DIR": str(tmp_path / "data"), **kwargs.get("extra_env", {})}
        node = NodeProcess(api_url, creds["join_token"], tmp_path / f"node-{index}.log", **kwargs)
        started.append(node.start())
        return node

    yield start
    for node in started:
        node.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for node in started:
            print(f"----- {node.log_path.name} -----\n{node.log()}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the test item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report


@dataclass
class LongTtlCluster:
    """A gateway of the test's own with a 60 s node TTL, its user API, and ``start(name)`` for nodes."""

    api: Api
    http: httpx.Client
    start: Callable[[str], NodeProcess]


@pytest.fixture()
def long_ttl_cluster(redis_url: str, creds: dict[str, str], tmp_path: Path) -> Iterator[LongTtlCluster]:
    """For tests of a restart "within the TTL": that must not depend on how fast a restart that
    imports torch is on a busy machine (2-4 s), which the session's 2 s TTL would."""
    gateway, url = start_gateway(redis_url, {"CYXWIZ_TTL_S": "60"})
    nodes: list[NodeProcess] = []

    def start(name: str) -> NodeProcess:
        node = NodeProcess(url, creds["join_token"], tmp_path / f"{name}-{len(nodes)}.log", name=name,
                           extra_env={"CYXWIZ_DATA_DIR": str(tmp_path / "data")}).start()
        nodes.append(node)
        return node

    try:
        with httpx.Client(base_url=url, timeout=10) as http:
            yield LongTtlCluster(Api(http, creds["api_key"]), http, start)
    finally:
        for node in nodes:
            node.stop()
        gateway.terminate()
        gateway.wait(10)
