"""Locust users of CyxWiz that speak only the public contract (HTTP, plus each node's assignment stream).

- :class:`NodeUser` is a node runtime without the training: it registers once with realistic
  capabilities, heartbeats on the interval the server gave it, reads its assignments from its stream
  (XREADGROUP on the ``{stream, group}`` of its registration), reports progress, uploads
  ``model.safetensors`` and reports completion (a few percent fail, as jobs do).
- :class:`ClientUser` is a tenant: it submits jobs, polls them, lists them, reads progress,
  downloads weights and cancels a few.

Credentials: ``CYXWIZ_API_KEY`` (an admin key: each client user makes its own tenant key with it),
``CYXWIZ_JOIN_TOKEN`` and ``CYXWIZ_REDIS_URL``, else the ``credentials.json`` that ``cyxwiz serve``
writes (in ``$CYXWIZ_DATA_DIR``, else ``~/.cyxwiz``). Run against any deployment with
``locust -f load_tests/locustfile.py --host URL``; ``python -m load_tests.run`` starts a local one.

Expected refusals are not failures: a 409 ``job_cancelled``/``stale_attempt`` tells a node to stop
that job, and a 409 ``job_terminal`` answers a cancel that lost the race with completion.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import redis
from locust import between, constant, events, task
from locust.contrib.fasthttp import FastHttpUser

from shared.safetensors_check import digest_bytes, placeholder_weights

# Simulated training: a job runs this many seconds (x 0.5..1.5) and reports this often.
JOB_SECONDS = float(os.environ.get("CYXWIZ_LOAD_JOB_S", "2.0"))
REPORT_EVERY_S = float(os.environ.get("CYXWIZ_LOAD_REPORT_EVERY_S", "0.5"))
FAIL_FRACTION = 0.03  # jobs whose (simulated) training fails: the job's fault, not retried
_ids = itertools.count()


def _credentials() -> dict[str, Any]:
    data_dir = Path(os.environ.get("CYXWIZ_DATA_DIR") or Path.home() / ".cyxwiz")
    path = data_dir / "credentials.json"
    found: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    for name in ("api_key", "join_token", "redis_url"):
        env = os.environ.get("CYXWIZ_" + name.upper())
        if env:
            found[name] = env
    return found


CREDS = _credentials()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@functools.cache
def weights_for(spec: str) -> bytes:
    """A model.safetensors the gateway accepts for a job of this (normalized, JSON) spec: the names and
    shapes it builds, zero weights (uploads are checked against the spec)."""
    return placeholder_weights(json.loads(spec))

# Hosts as they register: a realistic mix of GPU servers, workstations and CPU boxes.
HOSTS: list[dict[str, Any]] = [
    {"slots": 2, "capabilities": {"device": "cuda", "cpu_cores": 32, "ram_mb": 262144, "cuda_version": "12.4",
                                  "torch_version": "2.5.1",
                                  "gpus": [{"name": "NVIDIA A100-SXM4-80GB", "memory_mb": 81920,
                                            "compute_capability": "8.0"}] * 2}},
    {"slots": 1, "capabilities": {"device": "cuda", "cpu_cores": 16, "ram_mb": 65536, "cuda_version": "12.4",
                                  "torch_version": "2.5.1",
                                  "gpus": [{"name": "NVIDIA GeForce RTX 4090", "memory_mb": 24564,
                                            "compute_capability": "8.9"}]}},
    {"slots": 1, "capabilities": {"device": "cpu", "cpu_cores": 8, "ram_mb": 32768, "torch_version": "2.5.1"}},
    {"slots": 2, "capabilities": {"device": "cpu", "cpu_cores": 64, "ram_mb": 131072, "torch_version": "2.5.1"}},
]
REGIONS = ("eu-west", "us-east", "ap-south")

# Jobs as users submit them: small MLPs and CNNs on the shipped data, a few transformers, some GPU-only.
SPECS: list[tuple[int, dict[str, Any]]] = [
    (6, {"name": "digits-mlp", "model": {"type": "mlp", "hidden": [128, 64], "activation": "gelu"},
         "dataset": {"name": "digits", "val_fraction": 0.2}, "training": {"epochs": 5, "batch_size": 64}}),
    (2, {"name": "digits-cnn", "model": {"type": "cnn"}, "dataset": {"name": "digits"},
         "training": {"epochs": 3, "batch_size": 32}, "priority": "high"}),
    (2, {"name": "spirals", "model": {"type": "mlp", "hidden": [64, 64]}, "dataset": {"name": "spirals"},
         "training": {"epochs": 10}, "priority": "low"}),
    (1, {"name": "tiny-gpt", "model": {"type": "transformer"}, "dataset": {"name": "tiny-text"},
         "training": {"epochs": 2}, "requirements": {"gpu": True, "min_gpu_memory_mb": 16000}}),
]


def fire(request_type: str, name: str, started: float, *, exception: Exception | None = None) -> None:
    """Record a non-HTTP operation (a stream read) in Locust's statistics."""
    events.request.fire(request_type=request_type, name=name, response_time=(time.perf_counter() - started) * 1000,
                        response_length=0, exception=exception, context={})


class NodeUser(FastHttpUser):
    """A node: register, heartbeat on its interval, run what its stream assigns, report, drain at the end."""

    weight = 1
    wait_time = constant(0)  # the work loop paces itself on the heartbeat interval and the stream

    def on_start(self) -> None:
        host = dict(random.choice(HOSTS))
        self.slots: int = host["slots"]
        body = {"name": f"load-node-{os.getpid()}-{next(_ids)}", "slots": self.slots,
                "capabilities": host["capabilities"], "labels": {"region": random.choice(REGIONS)}}
        with self.client.post("/v1/nodes", json=body, headers=bearer(CREDS["join_token"]),
                              catch_response=True) as resp:
            if resp.status_code != 201:
                resp.failure(f"register: {resp.status_code} {resp.text}")
                raise RuntimeError("node registration failed")
            reg = resp.json()
        self.node_id: str = reg["node_id"]
        self.auth = bearer(reg["session_token"])
        self.interval_s: float = float(reg["heartbeat_interval_s"])
        self.stream: str = reg["assignments"]["stream"]
        self.stream_group: str = reg["assignments"]["group"]
        # its own store user, as a real node: it can read and acknowledge this stream and nothing else
        self.redis = redis.Redis.from_url(reg["assignments"]["redis_url"], decode_responses=True, socket_timeout=30)
        self.cancelled: set[str] = set()
        self.registered = True
        # Real runtimes start at different moments: the first beat falls anywhere in the interval.
        self.next_beat = time.monotonic() + random.uniform(0, self.interval_s)

    def on_stop(self) -> None:
        if getattr(self, "registered", False):
            self.registered = False
            self.client.delete(f"/v1/nodes/{self.node_id}", headers=self.auth, name="/v1/nodes/[id]")
            self.redis.close()

    def heartbeat_if_due(self) -> None:
        if time.monotonic() < self.next_beat:
            return
        self.next_beat = time.monotonic() + self.interval_s
        resp = self.client.post(f"/v1/nodes/{self.node_id}/heartbeat", json={},
                                headers=self.auth, name="/v1/nodes/[id]/heartbeat")
        if resp.status_code == 200:
            self.cancelled.update(resp.json().get("cancel", []))

    @task
    def work(self) -> None:
        self.heartbeat_if_due()
        block_ms = int(max(0.05, min(2.0, self.next_beat - time.monotonic())) * 1000)
        started = time.perf_counter()
        try:
            answer = self.redis.xreadgroup(self.stream_group, self.node_id, {self.stream: ">"}, count=self.slots,
                                           block=block_ms)
        except redis.RedisError as exc:
            fire("REDIS", "XREADGROUP assignments", started, exception=exc)
            time.sleep(0.5)
            return
        for _, entries in answer or []:
            for entry_id, fields in entries:
                # The entry id is the server's clock at assignment: this is assignment-to-node delivery.
                assigned_ms = int(entry_id.split("-")[0])
                events.request.fire(request_type="STREAM", name="assignment delivered",
                                    response_time=max(0.0, time.time() * 1000 - assigned_ms),
                                    response_length=0, exception=None, context={})
                if fields.get("task_id"):
                    self.run_verification(fields["task_id"], int(fields["attempt"]), fields["spec"])
                else:
                    self.run_job(fields["job_id"], int(fields["attempt"]), fields["spec"])
                self.redis.xack(self.stream, self.stream_group, entry_id)

    def run_verification(self, task_id: str, attempt: int, spec: str) -> None:
        """An audit's replay, simulated: every simulated trainer uploads the same weights for a spec, so
        the replay "finds" their digest and the audit passes (the real replay is tested elsewhere)."""
        time.sleep(JOB_SECONDS * random.uniform(0.2, 0.5))
        body = {"attempt": attempt, "phase": "digest", "weights": digest_bytes(weights_for(spec)).weights}
        with self.client.post(f"/v1/verifications/{task_id}", json=body, headers=self.auth,
                              name="/v1/verifications/[id]", catch_response=True) as resp:
            if resp.status_code == 200 or (resp.status_code == 409 and _error_code(resp) == "stale_attempt"):
                resp.success()
            else:
                resp.failure(f"verification: {resp.status_code} {_error_code(resp)}")

    def report(self, job_id: str, body: dict[str, Any]) -> bool:
        """Send one progress report; False when the server says to stop this job (a 409)."""
        with self.client.post(f"/v1/jobs/{job_id}/progress", json=body, headers=self.auth,
                              name="/v1/jobs/[id]/progress", catch_response=True) as resp:
            if resp.status_code == 200:
                resp.success()
                return True
            code = _error_code(resp)
            if resp.status_code == 409 and code in ("job_cancelled", "stale_attempt", "job_terminal"):
                resp.success()  # the contract's way to tell a node to stop: expected, not a failure
                return False
            resp.failure(f"progress: {resp.status_code} {code}")
            return False

    def run_job(self, job_id: str, attempt: int, spec: str) -> None:
        seconds = JOB_SECONDS * random.uniform(0.5, 1.5)
        reports = max(1, int(seconds / REPORT_EVERY_S))
        total_steps = reports * 10
        for seq in range(reports):
            if job_id in self.cancelled:
                self.cancelled.discard(job_id)
                return
            loss = 2.3 * 0.7 ** seq
            metrics = {"loss": loss, "accuracy": 1 - loss / 2.5, "samples_per_s": random.uniform(4000, 6000)}
            body = {"attempt": attempt, "seq": seq, "status": "running", "epoch": seq * 5 // reports + 1,
                    "step": (seq + 1) * 10, "total_steps": total_steps, "metrics": metrics}
            if not self.report(job_id, body):
                return
            time.sleep(REPORT_EVERY_S)
            self.heartbeat_if_due()
        if random.random() < FAIL_FRACTION:
            self.report(job_id, {"attempt": attempt, "seq": reports, "status": "failed",
                                 "error": "loss became NaN at step 3 (simulated)"})
            return
        with self.client.put(f"/v1/jobs/{job_id}/artifacts/model.safetensors", data=weights_for(spec),
                             headers={**self.auth, "X-CyxWiz-Attempt": str(attempt),
                                      "Content-Type": "application/octet-stream"},
                             name="/v1/jobs/[id]/artifacts/model.safetensors", catch_response=True) as resp:
            if resp.status_code == 409 and _error_code(resp) in ("job_cancelled", "stale_attempt", "job_terminal"):
                resp.success()
                return
            if resp.status_code != 201:
                resp.failure(f"upload: {resp.status_code} {resp.text[:200]}")
                return
        self.report(job_id, {"attempt": attempt, "seq": reports, "status": "completed", "epoch": 5,
                             "step": total_steps, "total_steps": total_steps,
                             "metrics": {"loss": 0.05, "accuracy": 0.97, "val_loss": 0.08, "val_accuracy": 0.96},
                             "artifacts": ["model.safetensors"]})


def _error_code(resp: Any) -> str:
    try:
        return str(resp.json()["error"]["code"])
    except Exception:
        return "unparsable"


class ClientUser(FastHttpUser):
    """A tenant: submit, poll, list, read progress, download weights, sometimes cancel."""

    weight = 1
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        tenant = f"load-{os.getpid()}-{next(_ids)}"
        self.auth = bearer(CREDS["api_key"])
        with self.client.post("/v1/keys", json={"tenant": tenant}, headers=self.auth, catch_response=True) as resp:
            if resp.status_code == 201:
                self.auth = bearer(resp.json()["api_key"])
            else:  # not an admin key: act as that key's own tenant
                resp.success()
        self.jobs: list[str] = []
        self.completed: list[str] = []

    def _job_id(self) -> str | None:
        return random.choice(self.jobs[-20:]) if self.jobs else None

    @task(4)
    def submit(self) -> None:
        spec = random.choices([s for _, s in SPECS], weights=[w for w, _ in SPECS])[0]
        headers = self.auth
        if random.random() < 0.1:  # a retried submission: the same Idempotency-Key twice
            headers = {**self.auth, "Idempotency-Key": f"retry-{random.getrandbits(64):x}"}
            self.client.post("/v1/jobs", json=spec, headers=headers)
        with self.client.post("/v1/jobs", json=spec, headers=headers, catch_response=True) as resp:
            if resp.status_code in (200, 201):
                self.jobs.append(resp.json()["job_id"])
                self.jobs = self.jobs[-100:]
            else:
                resp.failure(f"submit: {resp.status_code} {resp.text[:200]}")

    @task(6)
    def poll(self) -> None:
        job_id = self._job_id()
        if job_id is None:
            return
        resp = self.client.get(f"/v1/jobs/{job_id}", headers=self.auth, name="/v1/jobs/[id]")
        if resp.status_code == 200 and resp.json()["status"] == "completed" and job_id not in self.completed:
            self.completed.append(job_id)
            self.completed = self.completed[-50:]

    @task(2)
    def list_jobs(self) -> None:
        status = random.choice([None, None, "running", "completed", "queued"])
        path = "/v1/jobs?limit=20" + (f"&status={status}" if status else "")
        self.client.get(path, headers=self.auth, name="/v1/jobs?status=[s]&limit=20")

    @task(1)
    def progress(self) -> None:
        job_id = self._job_id()
        if job_id is not None:
            self.client.get(f"/v1/jobs/{job_id}/progress", headers=self.auth, name="/v1/jobs/[id]/progress")

    @task(1)
    def download(self) -> None:
        if self.completed:
            job_id = random.choice(self.completed)
            self.client.get(f"/v1/jobs/{job_id}/artifacts/model.safetensors", headers=self.auth,
                            name="/v1/jobs/[id]/artifacts/model.safetensors")

    @task(1)
    def cancel(self) -> None:
        job_id = self._job_id()
        if job_id is None:
            return
        with self.client.post(f"/v1/jobs/{job_id}/cancel", headers=self.auth, name="/v1/jobs/[id]/cancel",
                              catch_response=True) as resp:
            if resp.status_code == 202 or (resp.status_code == 409 and _error_code(resp) == "job_terminal"):
                resp.success()  # cancelling a job that already ended answers 409: expected
            else:
                resp.failure(f"cancel: {resp.status_code} {resp.text[:200]}")
