"""Two hosts for real: a node runtime in its own network namespace joins a `cyxwiz serve` that listens
on a veth address, given only the API URL and the join token, and trains a job end to end over the
link: its store address comes from its registration, with its own store user."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

from load_tests.netns import host_pair, unavailable_reason
from node_runtime.training import load_trained_model
from tests.conftest import DIGITS_SPEC
from tests.node_runtime.node_harness import Api, NodeProcess, serve_on

REASON = unavailable_reason()
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180),
              pytest.mark.skipif(REASON is not None, reason=f"two-host test: {REASON}")]


def test_a_node_on_another_host_joins_with_the_api_url_and_join_token_alone(tmp_path: Path) -> None:
    with host_pair() as pair, serve_on(pair.host_ip, tmp_path) as (api_url, creds):
        node = None
        try:
            assert creds["api_url"] == api_url
            # nothing but the API URL and the join token (through the environment), on the other host
            node = NodeProcess(api_url, creds["join_token"], tmp_path / "node.log", name="remote",
                               netns=pair.netns, extra_env={"CYXWIZ_DATA_DIR": str(tmp_path / "remote")}).start()
            with httpx.Client(base_url=api_url, timeout=10) as http:
                api = Api(http, creds["api_key"])
                [remote] = api.wait_nodes(1, timeout_s=60)
                job = api.wait_status(api.submit(DIGITS_SPEC), ("completed", "failed"), 120)
                assert job["status"] == "completed", job["error"] + node.log()
                assert job["node_id"] == remote["node_id"]
                assert load_trained_model(api.artifact(job["job_id"]))(torch.rand(1, 64)).shape == (1, 10)
            saved = json.loads((tmp_path / "remote" / "nodes" / "remote.json").read_text())
            stream_url = saved["registration"]["redis_url"]
            assert f"@{pair.host_ip}:{creds['store_port']}/" in stream_url  # the store, over the link
            assert stream_url.startswith(f"redis://node-{remote['node_id']}:")
        finally:
            if node is not None:
                node.stop()
