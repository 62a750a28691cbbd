"""The store users' names, rules and URLs, and which store address a node is told."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import pytest

from shared import store_users


def test_a_node_url_carries_the_node_user_and_keeps_scheme_and_database() -> None:
    url = store_users.with_credentials("rediss://store.example:6380/0", "node-n-1", "p@ss/word")
    parts = urlsplit(url)
    assert parts.scheme == "rediss" and parts.hostname == "store.example" and parts.port == 6380
    assert parts.path == "/0" and parts.username == "node-n-1" and unquote(parts.password or "") == "p@ss/word"
    assert store_users.without_credentials(url) == "rediss://store.example:6380/0"


@pytest.mark.parametrize(("store_url", "public", "request_host", "expected"), [
    # the operator said where (NAT, DNS): that, whatever else
    ("redis://u:p@127.0.0.1:7000/0", "redis://store.example:7000/0", "10.0.0.1", "redis://store.example:7000/0"),
    # the store listens on a real address (serve --host 10.0.0.1, or an external Redis): that address
    ("redis://u:p@10.0.0.1:7000/0", "", "api.example", "redis://10.0.0.1:7000/0"),
    ("rediss://u:p@redis.internal:6380/2", "", "api.example", "rediss://redis.internal:6380/2"),
    # the embedded store beside the gateway on loopback: the host the node reached the API at
    ("redis://u:p@127.0.0.1:7000/0", "", "10.213.0.1", "redis://10.213.0.1:7000/0"),
    ("redis://u:p@127.0.0.1:7000/0", "", "fd00::1", "redis://[fd00::1]:7000/0"),
    ("redis://u:p@127.0.0.1:7000/0", "", None, "redis://127.0.0.1:7000/0"),
])
def test_which_store_address_a_node_is_told(store_url: str, public: str, request_host: str | None,
                                            expected: str) -> None:
    assert store_users.node_store_address(store_url, public, request_host) == expected


def test_node_rules_name_one_stream_and_four_commands() -> None:
    rules = store_users.node_rules("n-0123456789abcdef", "ab" * 32)
    assert rules[0] == "reset" and "~cyxwiz:node:n-0123456789abcdef:assignments" in rules
    assert [r for r in rules if r.startswith("~")] == ["~cyxwiz:node:n-0123456789abcdef:assignments"]
    assert [r for r in rules if r.startswith("+")] == ["+xreadgroup", "+xack", "+xdel", "+ping"]
    assert "-@all" in rules and "#" + "ab" * 32 in rules and "resetchannels" in rules


def test_a_host_override_keeps_the_node_credentials_scheme_and_database() -> None:
    url = "rediss://node-n-1:p%40ss@10.0.0.1:6380/0?ssl_cert_reqs=required"
    assert store_users.with_host(url, "store.example") == "rediss://node-n-1:p%40ss@store.example:6380/0?ssl_cert_reqs=required"
    assert store_users.with_host(url, "fd00::2", 7000) == "rediss://node-n-1:p%40ss@[fd00::2]:7000/0?ssl_cert_reqs=required"
