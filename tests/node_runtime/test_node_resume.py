"""A runtime restarted with a registration it saved before registrations kept the node's address: it
must not resume as that node (its gang ranks would be given no address of their own)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from node_runtime.identity import identity_path
from tests.node_runtime.conftest import LongTtlCluster
from tests.node_runtime.node_harness import wait_until

pytestmark = pytest.mark.timeout(120)


def test_a_registration_saved_without_its_address_is_left_for_a_fresh_one(
        long_ttl_cluster: LongTtlCluster, tmp_path: Path) -> None:
    api, start = long_ttl_cluster.api, long_ttl_cluster.start
    first = start("legacy")
    [before] = api.wait_nodes(1)
    first.signal(signal.SIGKILL)  # well within the TTL: the control plane still knows the node
    first.wait(10)
    path = identity_path(tmp_path / "data" / "nodes", "legacy")
    saved = json.loads(path.read_text())
    del saved["registration"]["address"]  # as a runtime of before the address saved it
    path.write_text(json.dumps(saved))

    again = start("legacy")
    [after] = wait_until(lambda: [n for n in api.nodes() if n["node_id"] != before["node_id"]], 60,
                         what="a fresh registration")
    assert after["name"] == "legacy" and after["status"] == "online" and after["address"]
    assert [n["node_id"] for n in api.nodes()] == [after["node_id"]]  # the old registration left at once
    assert "saved without its address" in again.log()
    assert json.loads(path.read_text())["registration"]["address"] == after["address"]
