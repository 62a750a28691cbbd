"""An operator's own Redis with TLS: `cyxwiz serve --redis-url rediss://...` runs the cluster over it,
and nodes are handed a `rediss://` URL for their own store user, so their assignments travel over
TLS too. Debian's `redis-server` (7.0, built with TLS) plays the operator's Redis."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from cyxwiz.embedded import free_port
from cyxwiz.server import wait_healthy
from shared import store_users
from tests.conftest import DIGITS_SPEC, REPO, TEST_ENV
from tests.cyxwiz.test_serve import _private_ca_and_certificate
from tests.node_runtime.node_harness import Api, NodeProcess

pytestmark = [
    pytest.mark.slow, pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("openssl") is None,
                       reason="needs Debian's redis-server (TLS) and openssl; scripts/test installs them as root"),
]


def _start_tls_redis(where: Path, ca: Path, cert: Path, key: Path, admin: str, gateway: str) -> tuple[
        subprocess.Popen[bytes], int]:
    (where / "users.acl").write_text("\n".join([
        "user default off",
        store_users.acl_file_line(store_users.ADMIN_USER, store_users.secret_hash(admin), store_users.ADMIN_RULES),
        store_users.acl_file_line(store_users.GATEWAY_USER, store_users.secret_hash(gateway),
                                  store_users.GATEWAY_RULES),
    ]) + "\n")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                             "--tls-auth-clients", "no", "--aclfile", str(where / "users.acl"), "--save", "",
                             "--appendonly", "no", "--dir", str(where)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis.from_url(f"rediss://{store_users.ADMIN_USER}:{admin}@127.0.0.1:{port}/0",
                                  ssl_ca_certs=str(ca), socket_timeout=1)
    deadline = time.monotonic() + 15
    while True:
        try:
            if client.ping():
                break
        except redis.RedisError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.1)
    client.close()
    return proc, port


def test_a_cluster_on_a_tls_redis_hands_nodes_rediss_urls(tmp_path: Path) -> None:
    ca, cert, key = _private_ca_and_certificate(tmp_path)
    admin, gateway = store_users.new_password(), store_users.new_password()
    store, store_port = _start_tls_redis(tmp_path, ca, cert, key, admin, gateway)
    api_port = free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    # every process of this host trusts the private CA that signed the Redis's certificate
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYXWIZ_")} | TEST_ENV | {
        "CYXWIZ_DATA_DIR": str(tmp_path / "data"), "SSL_CERT_FILE": str(ca)}
    store_url = f"rediss://{store_users.GATEWAY_USER}:{gateway}@127.0.0.1:{store_port}/0"
    with open(tmp_path / "serve.log", "ab") as log:
        serve = subprocess.Popen([sys.executable, "-m", "cyxwiz.cli", "serve", "--port", str(api_port)],
                                 env=env | {"CYXWIZ_REDIS_URL": store_url}, cwd=REPO, stdout=log,
                                 stderr=subprocess.STDOUT)
    node = None
    try:
        assert wait_healthy(api_url, 30), (tmp_path / "serve.log").read_text()
        creds = json.loads((tmp_path / "data" / "credentials.json").read_text())
        node = NodeProcess(api_url, creds["join_token"], tmp_path / "node.log", name="tls-store-node",
                           extra_env={"CYXWIZ_DATA_DIR": str(tmp_path / "node"), "SSL_CERT_FILE": str(ca)}).start()
        with httpx.Client(base_url=api_url, timeout=10) as http:
            api = Api(http, creds["api_key"])
            [remote] = api.wait_nodes(1, timeout_s=60)
            job = api.wait_status(api.submit(DIGITS_SPEC), ("completed", "failed"), 90)
            assert job["status"] == "completed" and job["node_id"] == remote["node_id"], job["error"] + node.log()
        saved = json.loads((tmp_path / "node" / "nodes" / "tls-store-node.json").read_text())
        assert saved["registration"]["redis_url"].startswith(f"rediss://node-{remote['node_id']}:")
        with pytest.raises(redis.ConnectionError):  # the store speaks TLS only
            redis.Redis(port=store_port, socket_timeout=2, socket_connect_timeout=2).ping()
    finally:
        if node is not None:
            node.stop()
        serve.terminate()
        serve.wait(30)
        store.terminate()
        store.wait(10)
