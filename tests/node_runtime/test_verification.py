"""Trust no result: each attack of issue 11 replayed against the real stack (a gateway with audits on,
real node runtimes, a malicious node played by this test over the real HTTP API and its own store
user), and an honest cluster that passes every audit. docs/verification.md is the design."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch

from node_runtime.training.checkpoints import Position, encode_checkpoint, encode_weights, load_trained_model
from node_runtime.training.layers import make_optimizer
from node_runtime.training.models import build_model
from shared import keys
from shared.jobspec import known_data_info, parse_job_spec
from shared.safetensors_check import batches_per_epoch
from tests.conftest import DIGITS_SPEC, bearer, start_gateway
from tests.node_runtime.node_harness import Api, NodeProcess, wait_until

pytestmark = pytest.mark.timeout(600)


def unique(prefix: str) -> str:
    """Node names are identities whose audit record lives in the shared store: one per test."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


class Cluster:
    """A gateway of this test's own with audits on, the user's API, and node runtimes."""

    def __init__(self, url: str, http: httpx.Client, creds: dict[str, str], tmp_path: Path, store_url: str) -> None:
        self.url, self.http, self.creds, self.tmp_path = url, http, creds, tmp_path
        self.store = redis.Redis.from_url(store_url, decode_responses=True)
        self.api = Api(http, creds["api_key"])
        self.nodes: list[NodeProcess] = []

    def start(self, prefix: str = "honest") -> NodeProcess:
        name = unique(prefix)
        node = NodeProcess(self.url, self.creds["join_token"], self.tmp_path / f"{name}.log", name=name,
                           extra_env={"CYXWIZ_DATA_DIR": str(self.tmp_path / "data")}).start()
        self.nodes.append(node)
        return node

    def node(self, name: str) -> dict[str, Any]:
        return next(n for n in self.api.nodes() if n["name"] == name)


@pytest.fixture()
def cluster_factory(redis_url: str, creds: dict[str, str], tmp_path: Path,
                    request: pytest.FixtureRequest) -> Iterator[Callable[..., Cluster]]:
    made: list[tuple[Any, Cluster]] = []

    def make(audit_fraction: str = "0.1", probation_audits: str = "2") -> Cluster:
        gateway, url = start_gateway(redis_url, {"CYXWIZ_PROBATION_AUDITS": probation_audits,
                                                 "CYXWIZ_AUDIT_FRACTION": audit_fraction})
        cluster = Cluster(url, httpx.Client(base_url=url, timeout=20), creds, tmp_path, redis_url)
        made.append((gateway, cluster))
        return cluster

    yield make
    for gateway, cluster in made:
        for node in cluster.nodes:
            node.stop()
        cluster.http.close()
        gateway.terminate()
        gateway.wait(10)
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            for node in cluster.nodes:
                print(f"----- {node.log_path.name} -----\n{node.log()[-6000:]}")


class RogueNode:
    """A node run by an attacker: registers with the join token, reads its own assignment stream, and
    then says and uploads whatever it likes through the same API an honest runtime uses."""

    def __init__(self, cluster: Cluster, capabilities: dict[str, Any] | None = None, slots: int = 1) -> None:
        self.http, self.name = cluster.http, unique("rogue")
        body = {"name": self.name, "slots": slots,
                "capabilities": capabilities or {"device": "cpu", "cpu_cores": 2, "ram_mb": 8192, "gpus": []}}
        resp = self.http.post("/v1/nodes", json=body, headers=bearer(cluster.creds["join_token"]))
        assert resp.status_code == 201, resp.text
        answer = resp.json()
        self.body, self.node_key = body, answer.get("node_key")
        self.node_id, self.headers = answer["node_id"], bearer(answer["session_token"])
        self.stream = answer["assignments"]
        self.store = redis.Redis.from_url(self.stream["redis_url"], decode_responses=True)
        self.seq = 0
        self.alive = True
        self.beats = threading.Thread(target=self._beat, daemon=True)
        self.beats.start()

    def _beat(self) -> None:
        while self.alive:
            try:
                self.http.post(f"/v1/nodes/{self.node_id}/heartbeat", json={}, headers=self.headers)
            except (httpx.HTTPError, RuntimeError):  # RuntimeError: the test closed the client
                pass
            time.sleep(0.3)

    def assignment(self, timeout_s: float = 20) -> dict[str, Any]:
        def read() -> dict[str, Any] | None:
            reply = self.store.xreadgroup(self.stream["group"], self.node_id, {self.stream["stream"]: ">"},
                                          count=1, block=200)
            return reply[0][1][0][1] if reply else None

        return wait_until(read, timeout_s, interval_s=0, what=f"an assignment for {self.name}")

    def report(self, job_id: str, attempt: int, **body: Any) -> httpx.Response:
        self.seq += 1
        return self.http.post(f"/v1/jobs/{job_id}/progress", headers=self.headers,
                              json={"attempt": attempt, "seq": self.seq, **body})

    def upload(self, job_id: str, attempt: int, name: str, data: bytes) -> httpx.Response:
        return self.http.put(f"/v1/jobs/{job_id}/artifacts/{name}", content=data,
                             headers={**self.headers, "X-CyxWiz-Attempt": str(attempt)})

    def leave(self) -> None:
        self.alive = False
        self.beats.join(5)
        self.http.delete(f"/v1/nodes/{self.node_id}", headers=self.headers)


def digits(epochs: int, name: str = "digits", **training: Any) -> dict[str, Any]:
    spec = {**DIGITS_SPEC, "name": name}
    spec["training"] = {**DIGITS_SPEC["training"], "epochs": epochs, **training}
    return spec


def forged_model(spec: dict[str, Any], value: float | None) -> tuple[dict[str, Any], Any, Any]:
    """The job's model built with the runtime's own code, every weight set to ``value`` (None: random)."""
    spec = parse_job_spec(spec)
    info = known_data_info(spec["dataset"])
    model = build_model(spec, info)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value) if value is not None else p.normal_()
    return spec, info, model


def assert_honest_weights(data: bytes) -> None:
    model = load_trained_model(data)
    weights = torch.cat([p.flatten() for p in model.parameters()])
    assert not torch.all(weights == 0.4242) and weights.std() > 0.01


def wait_completed_and_verified(api: Api, job_id: str, timeout_s: float) -> dict[str, Any]:
    job = api.wait_status(job_id, ("completed", "failed", "cancelled"), timeout_s)
    assert job["status"] == "completed", job
    return job


def test_a_poisoned_checkpoint_is_caught_and_the_job_trains_again(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = cluster_factory()
    api = cluster.api
    rogue = RogueNode(cluster)  # alone: the job is its
    raw_spec = digits(20, checkpoint={"min_interval_s": 0.5})
    job_id = api.submit(raw_spec)
    entry = rogue.assignment()
    assert entry["job_id"] == job_id
    spec, info, model = forged_model(raw_spec, 0.4242)
    steps = 20 * batches_per_epoch(spec)
    optimizer = make_optimizer(model, spec, False)
    poisoned = encode_checkpoint(spec, model, optimizer, Position(epoch=20, batch=0, step=steps),
                                 {"val": {"val_accuracy": 0.9999, "val_loss": 0.001},
                                  "epoch_totals": {"loss_sum": 0.0, "correct": 0, "predictions": 0, "samples": 0,
                                                   "seconds": 0.0}},
                                 torch.device("cpu"), threads=1, device_kind="cpu")
    assert rogue.report(job_id, 1, status="running", epoch=20, step=steps, total_steps=steps,
                        metrics={"val_accuracy": 0.9999}).status_code == 200
    resp = rogue.upload(job_id, 1, "checkpoint.safetensors", poisoned)
    assert resp.status_code == 201, resp.text  # well formed: only a replay can tell
    assert rogue.report(job_id, 1, status="queued").status_code == 200  # "draining": hands it back
    rogue.leave()
    honest = [cluster.start(), cluster.start()]
    job = wait_completed_and_verified(api, job_id, 240)
    assert job["verification"]["status"] == "passed", job["verification"]
    # a later attempt resumed from the poison (zero steps of its own), was caught, and the job trained again
    # from the seed: the poisoned checkpoint is never resumed from after its producer was slashed
    assert any(a["started_from"] == f"a1s{steps}" for a in job["attempts"][1:-1])
    assert job["attempts"][-1]["started_from"] is None
    assert_honest_weights(api.artifact(job_id))
    assert job["progress"]["metrics"]["val_accuracy"] < 0.9999
    names = {n.command[n.command.index("--name") + 1] for n in honest}
    verifier = next(n for n in api.nodes() if n["node_id"] == job["verification"]["verifier"])
    assert verifier["name"] in names
    # the liar: reputation 0 and banned under its identity
    resp = cluster.http.post("/v1/nodes", json={**rogue.body, "node_key": rogue.node_key},
                             headers=bearer(cluster.creds["join_token"]))
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "node_banned", resp.text
    assert float(cluster.store.hget(keys.REPUTATION, rogue.name)) == 0.0
    assert cluster.store.hexists(keys.NODES_BANNED, rogue.name)


def test_garbage_results_are_refused_or_caught(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = cluster_factory()
    api = cluster.api
    rogue = RogueNode(cluster)
    raw_spec = digits(3)
    job_id = api.submit(raw_spec)
    rogue.assignment()
    honest = [cluster.start(), cluster.start()]
    api.wait_nodes(3)
    resp = rogue.upload(job_id, 1, "model.safetensors", b"x")
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid_artifact", resp.text
    assert "not a safetensors file" in resp.json()["error"]["message"]
    resp = rogue.report(job_id, 1, status="completed", epoch=3, step=69, total_steps=69,
                        metrics={"val_accuracy": 1.0}, artifacts=["model.safetensors"])
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "missing_artifact"
    spec, info, model = forged_model(raw_spec, None)
    garbage = encode_weights(spec, info, model, threads=1, device_kind="cpu")
    assert rogue.upload(job_id, 1, "model.safetensors", garbage).status_code == 201
    resp = rogue.report(job_id, 1, status="completed", epoch=3, step=69, total_steps=69,
                        metrics={"val_accuracy": 1.0}, artifacts=["model.safetensors"])
    assert resp.status_code == 200 and resp.json()["status"] == "running", resp.text  # held for its audit
    held = api.job(job_id)
    assert held["verification"]["status"] == "pending"
    job = wait_completed_and_verified(api, job_id, 240)
    assert job["verification"]["status"] == "passed" and job["attempt"] == 2
    assert_honest_weights(api.artifact(job_id))
    assert job["progress"]["metrics"]["val_accuracy"] < 1.0
    assert rogue.name not in {n["name"] for n in api.nodes()} and len(honest) == 2  # removed when slashed
    assert float(cluster.store.hget(keys.REPUTATION, rogue.name)) == 0.0
    rogue.alive = False


def test_lying_hardware_holds_one_job_then_is_caught(cluster_factory: Callable[..., Cluster]) -> None:
    """A CPU process registered as 8x H200 with 256 slots, 512 cores and 4 TB of RAM: on probation it
    ranks on nothing it claims and holds one job at a time; a job it black-holes ends at its wall-clock
    limit; its forged result is replayed on a node of another kind (no peer has what it claims) and
    caught, and the job waits for a node that really fits."""
    cluster = cluster_factory()
    api = cluster.api
    claims = {"device": "cuda", "cpu_cores": 512, "ram_mb": 4 * 2**20,
              "gpus": [{"name": "NVIDIA H200", "memory_mb": 143771, "compute_capability": "9.0"}] * 8}
    rogue = RogueNode(cluster, claims, slots=256)
    big = {"gpu": True, "min_gpu_memory_mb": 140000}
    # (the black hole's 10 s limit only has to outlast the next two requests)
    black_hole = api.submit({**digits(3, "black-hole", max_duration_s=10), "requirements": big})
    assert rogue.assignment()["job_id"] == black_hole
    rogue.report(black_hole, 1, status="running")  # and then nothing, while it keeps heartbeating
    forged_job = api.submit({**digits(3, "forged"), "requirements": big})
    assert api.job(forged_job)["status"] == "queued"  # only the fake fits it, and the fake is at its cap
    fake = cluster.node(rogue.name)
    assert fake["probation"] is True and fake["running_jobs"] == 1  # one job at a time, whatever its slots
    assert fake["capability"] == 0.0 and fake["claimed_capability"] > 0.5  # its claims earn it nothing
    honest = [cluster.start(), cluster.start()]
    api.wait_nodes(3)
    jobs = [api.submit(digits(2, f"small-{i}")) for i in range(6)]
    job = api.wait_status(black_hole, ("failed",), 60)  # the wall-clock limit ends the black hole
    assert "wall-clock" in job["error"]
    entry = rogue.assignment()
    assert entry["job_id"] == forged_job  # older than the small jobs: the fake's one slot goes to it
    spec, info, model = forged_model(parse_job_spec(json.loads(entry["spec"])), None)
    assert rogue.upload(forged_job, 1, "model.safetensors",
                        encode_weights(spec, info, model, device_kind="NVIDIA H200")).status_code == 201
    resp = rogue.report(forged_job, 1, status="completed", epoch=3, step=69, total_steps=69,
                        metrics={"val_accuracy": 0.99, "samples_per_s": 9e9}, artifacts=["model.safetensors"])
    assert resp.status_code == 200 and resp.json()["status"] == "running", resp.text  # held for its audit
    job = wait_until(lambda: (j := api.job(forged_job))["verification"]["status"] == "failed" and j, 240,
                     what="the forged result to be caught")
    assert job["status"] == "queued" and job["pending_reason"] == "no_node_fits"  # waits for a real GPU
    assert float(cluster.store.hget(keys.REPUTATION, rogue.name)) == 0.0
    assert cluster.store.hexists(keys.NODES_BANNED, rogue.name)
    for job_id in jobs:
        assert wait_completed_and_verified(api, job_id, 240)["node_id"] != rogue.node_id
    rogue.alive = False
    assert len(honest) == 2


SPECS = {
    "mlp": digits(2, "mlp"),
    "cnn": {**DIGITS_SPEC, "name": "cnn", "model": {"type": "cnn", "channels": [4], "hidden": [16]},
            "training": {**DIGITS_SPEC["training"], "epochs": 1}},
    "sequential": {**DIGITS_SPEC, "name": "seq",
                   "model": {"type": "sequential", "layers": [{"type": "linear", "out": 32}, {"type": "gelu"},
                                                              {"type": "dropout", "p": 0.1},
                                                              {"type": "linear", "out": 10}]},
                   "training": {**DIGITS_SPEC["training"], "epochs": 1, "checkpoint": {"min_interval_s": 0.5}}},
    "transformer": {"name": "lm", "model": {"type": "transformer", "d_model": 32, "n_layers": 1, "n_heads": 2,
                                            "d_ff": 64, "context": 32, "dropout": 0.1},
                    "dataset": {"name": "tiny-text"},
                    "training": {"epochs": 1, "batch_size": 32, "learning_rate": 0.003}},
}
HONEST_JOBS_PER_TYPE = 2  # 20 per type: python -m load_tests.audit (docs/benchmarks.md)


def test_an_honest_cluster_passes_every_audit(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = cluster_factory(audit_fraction="1")  # every result audited, not one in ten
    api = cluster.api
    for _ in range(3):
        cluster.start()
    api.wait_nodes(3)
    jobs = {kind: [api.submit({**spec, "training": {**spec["training"], "seed": seed}})
                   for seed in range(HONEST_JOBS_PER_TYPE)] for kind, spec in SPECS.items()}
    for kind, ids in jobs.items():
        for job_id in ids:
            job = wait_completed_and_verified(api, job_id, 400)
            assert job["verification"]["status"] == "passed", (kind, job["verification"])
            assert job["verification"]["distance"] == 0.0 and job["attempt"] == 1, (kind, job)
            verifier = job["verification"]["verifier"]
            assert verifier and verifier != job["node_id"]
    nodes = [n for n in api.nodes() if n["name"] in {c.command[c.command.index("--name") + 1] for c in cluster.nodes}]
    assert len(nodes) == 3
    assert all(n["audits_failed"] == 0 for n in nodes)
    assert sum(n["audits_passed"] for n in nodes) == HONEST_JOBS_PER_TYPE * len(SPECS)
    assert all(n["probation"] == (n["audits_passed"] < 2) for n in nodes)  # probation ends at 2 passed audits
    assert all(json.dumps(n).count("flag") == 1 and n["flag"] is None for n in nodes)
