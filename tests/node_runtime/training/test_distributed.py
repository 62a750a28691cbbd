"""Data-parallel training over real processes: ranks talk gloo over localhost TCP, as nodes would.

Each rank is a spawned process with one torch thread that calls ``run_training`` with a
``Distributed`` whose rendezvous goes through a multiprocessing queue (what the control plane does
over HTTP). The ranks start ``run_training`` together (a barrier), so the short timeouts below
measure the run, not how long a process took to import torch.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from typing import Any

import pytest
import safetensors.torch
import torch

from node_runtime.training import (
    Distributed,
    PeerLost,
    RendezvousTimeout,
    TrainingContext,
    TrainingResult,
    run_training,
)
from node_runtime.training.checkpoints import read_metadata
from node_runtime.training.distributed import interface_holding
from shared.jobspec import parse_job_spec

SPAWN = multiprocessing.get_context("spawn")
STARTUP_S = 60.0  # a spawned rank imports torch before the barrier: seconds on a busy 2-core machine
RUN_S = 60.0  # the longest a run below trains
# 1537 training digits: 24 batches of 64 and a last one of 1 row, which leaves rank 0's shard empty
DIGITS = {"name": "digits", "val_fraction": 0.109, "test_fraction": 0.0356}
MLP = {"type": "mlp", "hidden": [32], "norm": "layernorm", "dropout": 0.0}
# tiny-text in windows of 16: 9785 per epoch, 38 batches of 256 and a last one of 57 (ranks: 28 and 29)
TRANSFORMER = {"type": "transformer", "d_model": 32, "n_layers": 1, "n_heads": 2, "context": 16, "dropout": 0.0}
# 2 ranks against 1 process, the largest |difference| of a float32 weight, measured: 3e-8 for the MLP
# (50 AdamW steps); 3.1e-5 for the transformer (39 AdamW steps at lr 3e-3; 4.8e-7 with SGD): the ranks
# sum gradients in another order, and Adam divides tiny gradients (attention biases) by their own
# magnitude, so that rounding noise grows into a fraction of a step's update
TOLERANCE = {"digits-mlp": 1e-6, "transformer": 1e-4}


def spec_of(model: dict[str, Any], dataset: Any, **training: Any) -> dict[str, Any]:
    return parse_job_spec({"model": model, "dataset": dataset,
                           "training": {"epochs": 1, "progress_every_steps": 10, "progress_every_s": 3600.0,
                                        **training}})


@dataclass
class RankOutcome:
    """What a rank's process sends back: its result, or the exception it raised and when."""

    rank: int
    result: TrainingResult | None = None
    reports: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[bytes] = field(default_factory=list)
    error: str = ""  # "PeerLost: ..." / "RendezvousTimeout: ..."
    started_at: float = 0.0  # time.monotonic() (one clock for all processes on Linux) when training began
    ended_at: float = 0.0
    gone_at: float = 0.0  # when this rank killed or froze itself (then sent instead of its end)


def rank_main(rank: int, world_size: int, spec: dict[str, Any], timeout_s: float, behaviour: dict[str, Any],
              ports: multiprocessing.Queue[tuple[str, int]], outcomes: multiprocessing.Queue[RankOutcome],
              start: Barrier) -> None:
    """One rank's process. ``behaviour``: ``stop_after`` (should_stop turns True at that call, with
    ``stop_reason``), ``kill_after`` / ``freeze_after`` (SIGKILL / SIGSTOP itself at that call),
    ``port`` (ranks > 0: skip the queue and connect there), ``initial_checkpoint``."""
    outcome = RankOutcome(rank)
    calls = 0

    def should_stop() -> bool:
        nonlocal calls
        calls += 1
        for key, sig in (("kill_after", signal.SIGKILL), ("freeze_after", signal.SIGSTOP)):
            if calls == behaviour.get(key):
                outcomes.put(RankOutcome(rank, gone_at=time.monotonic()))
                outcomes.close()
                outcomes.join_thread()  # sent before the signal lands
                os.kill(os.getpid(), sig)
        return bool(calls >= behaviour.get("stop_after", float("inf")))

    def publish_master(port: int) -> None:
        for _ in range(world_size - 1):
            ports.put(("127.0.0.1", port))

    def find_master(deadline_s: float) -> tuple[str, int]:
        if "port" in behaviour:
            return "127.0.0.1", behaviour["port"]
        try:
            return ports.get(timeout=deadline_s)
        except queue.Empty:
            raise RendezvousTimeout(f"rank 0 published no port within {deadline_s:g} s") from None

    ctx = TrainingContext(report=outcome.reports.append, should_stop=should_stop,
                          save_checkpoint=outcome.checkpoints.append, cpu_threads=1,
                          initial_checkpoint=behaviour.get("initial_checkpoint"),
                          stop_reason=lambda: behaviour.get("stop_reason", 1),
                          distributed=Distributed(rank, world_size, "127.0.0.1", publish_master, find_master,
                                                  timeout_s=timeout_s))
    start.wait()
    outcome.started_at = time.monotonic()
    try:
        outcome.result = run_training(spec, ctx)
    except (PeerLost, RendezvousTimeout) as error:
        outcome.error = f"{type(error).__name__}: {error}"
    outcome.ended_at = time.monotonic()
    outcomes.put(outcome)


def run_ranks(spec: dict[str, Any], *, world_size: int = 2, ranks: list[int] | None = None,
              timeout_s: float = 30.0, behaviours: dict[int, dict[str, Any]] | None = None,
              ) -> dict[int, RankOutcome]:
    """Start the ranks (all of them unless ``ranks``), wait for each one's outcome, and kill whatever is
    left (a frozen rank). A rank that killed or froze itself is reported by its ``gone_at``."""
    ranks = list(range(world_size)) if ranks is None else ranks
    behaviours = behaviours or {}
    ports, outcomes = SPAWN.Queue(), SPAWN.Queue()
    start = SPAWN.Barrier(len(ranks))
    processes = [SPAWN.Process(target=rank_main, args=(rank, world_size, spec, timeout_s, behaviours.get(rank, {}),
                                                        ports, outcomes, start), daemon=True) for rank in ranks]
    for process in processes:
        process.start()
    received: dict[int, RankOutcome] = {}
    try:
        while len(received) < len(ranks):  # one outcome per rank: its end, or when it went
            outcome = outcomes.get(timeout=STARTUP_S + RUN_S + timeout_s)
            received[outcome.rank] = outcome
    finally:
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGKILL)
            process.join(timeout=30)
    return received


def weights(result: TrainingResult | None) -> dict[str, torch.Tensor]:
    assert result is not None
    return safetensors.torch.load(result.weights)


def position_of(checkpoint: bytes) -> dict[str, int]:
    position: dict[str, int] = json.loads(read_metadata(checkpoint)["position"])
    return position


@pytest.mark.parametrize(("kind", "spec"), [
    ("digits-mlp", spec_of(MLP, DIGITS, epochs=2, checkpoint={"enabled": False})),
    ("transformer", spec_of(TRANSFORMER, "tiny-text", batch_size=256, learning_rate=3e-3,
                            checkpoint={"enabled": False})),
], ids=["digits-mlp", "transformer"])
def test_two_ranks_train_like_one_process(kind: str, spec: dict[str, Any]) -> None:
    """The same global batches, split over two ranks: the same steps, weights and metrics as one process,
    up to the order in which float gradients are summed, last uneven (or one-row) batches included."""
    alone_reports: list[dict[str, Any]] = []
    alone = run_training(spec, TrainingContext(report=alone_reports.append, should_stop=lambda: False,
                                               save_checkpoint=lambda data: None, cpu_threads=1))
    outcomes = run_ranks(spec)
    leader, follower = outcomes[0], outcomes[1]
    assert leader.error == follower.error == ""
    assert leader.result is not None and follower.result is not None
    for result in (leader.result, follower.result):
        assert (result.status, result.step, result.epoch) == ("completed", alone.step, alone.epoch)
    assert follower.result.weights == b"" and follower.reports == [] and follower.checkpoints == []
    expected = weights(alone)
    for name, tensor in weights(leader.result).items():
        torch.testing.assert_close(tensor, expected[name], atol=TOLERANCE[kind], rtol=0, msg=f"{kind}: {name}")
    assert [r["step"] for r in leader.reports] == [r["step"] for r in alone_reports]
    for name in ("loss", "accuracy", "val_loss", "val_accuracy"):  # over every rank's shard
        assert leader.reports[-1]["metrics"][name] == pytest.approx(alone_reports[-1]["metrics"][name], rel=1e-3)
    for name in ("test_loss", "test_accuracy"):
        if name in alone.metrics:
            assert leader.result.metrics[name] == pytest.approx(alone.metrics[name], rel=1e-3)
    for name, value in leader.result.metrics.items():  # every rank ends knowing the global metrics
        if "samples_per_s" not in name and "tokens_per_s" not in name:  # a rate is over each rank's own time
            assert follower.result.metrics[name] == value, name
    for report in leader.reports:
        rates = [report["metrics"][f"samples_per_s/rank{rank}"] for rank in (0, 1)]
        assert all(rate > 0 for rate in rates)
        # the run's rate counts both ranks' samples over the same time
        assert report["metrics"]["samples_per_s"] == pytest.approx(sum(rates), rel=0.5)


def test_a_stop_on_one_rank_stops_both_and_the_run_resumes_exactly() -> None:
    """Rank 1's should_stop (a cancel: reason 2) stops both ranks before the same step; rank 0 alone
    saves that exact position, and two ranks resumed from it end as an uninterrupted pair does. With
    dropout: each rank draws its own masks, as a function of the step, so a resume draws the same."""
    spec = spec_of({**MLP, "dropout": 0.1}, DIGITS, epochs=2, checkpoint={"min_interval_s": 3600})
    whole = run_ranks(spec)[0].result
    stopped = run_ranks(spec, behaviours={1: {"stop_after": 33, "stop_reason": 2}})
    results = [stopped[rank].result for rank in (0, 1)]
    assert results[0] is not None and results[1] is not None and whole is not None
    assert results[0].status == results[1].status == "stopped"
    assert results[0].step == results[1].step and 25 < results[0].step < whole.step  # in the second epoch
    assert results[0].stop_reason == results[1].stop_reason == 2
    assert stopped[1].checkpoints == [] and len(stopped[0].checkpoints) == 1  # only the stop's, only rank 0's
    checkpoint = stopped[0].checkpoints[0]
    assert position_of(checkpoint)["step"] == results[0].step

    resumed = run_ranks(spec, behaviours={rank: {"initial_checkpoint": checkpoint} for rank in (0, 1)})[0].result
    assert resumed is not None and (resumed.status, resumed.step) == ("completed", whole.step)
    expected = weights(whole)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in weights(resumed).items())
    # the checkpoint holds the plain model: one process resumes it too
    alone = run_training(spec, TrainingContext(report=lambda progress: None, should_stop=lambda: False,
                                               save_checkpoint=lambda data: None, initial_checkpoint=checkpoint,
                                               cpu_threads=1))
    assert (alone.status, alone.step) == ("completed", whole.step)


@pytest.mark.parametrize("how", ["kill_after", "freeze_after"])
def test_a_lost_peer_raises_peer_lost_within_the_timeout(how: str) -> None:
    """Rank 1 is killed (its connections close: rank 0 learns at once) or frozen (nothing arrives:
    rank 0's collective times out) in the middle of training; rank 0 raises PeerLost, not a failure of
    its own, within timeout_s of the loss."""
    timeout_s = 6.0
    spec = spec_of(MLP, DIGITS, epochs=3, checkpoint={"enabled": False})
    outcomes = run_ranks(spec, timeout_s=timeout_s, behaviours={1: {how: 20}})
    assert outcomes[1].gone_at and outcomes[1].result is None
    leader = outcomes[0]
    assert leader.error.startswith("PeerLost: rank 0 of 2:"), leader.error
    assert leader.ended_at - outcomes[1].gone_at < timeout_s + 5.0  # 5 s: a busy machine's scheduling


def test_rendezvous_times_out_when_a_peer_never_comes() -> None:
    """Rank 1 looks for rank 0 at a port nobody listens on, so neither finds the other within timeout_s:
    each raises RendezvousTimeout (the fault of the node that did not come), rank 0 after waiting it out."""
    timeout_s = 3.0
    outcomes = run_ranks(spec_of(MLP, DIGITS, checkpoint={"enabled": False}), timeout_s=timeout_s,
                         behaviours={1: {"port": 1}})
    for rank in (0, 1):
        assert outcomes[rank].error.startswith(f"RendezvousTimeout: rank {rank} of 2:"), outcomes[rank].error
    assert outcomes[0].ended_at - outcomes[0].started_at >= timeout_s


def test_the_interface_holding_an_address() -> None:
    """Gloo binds the interface this names (GLOO_SOCKET_IFNAME): the loopback for 127.0.0.1, and none
    for an address this host does not hold."""
    loopback = interface_holding("127.0.0.1")
    assert loopback is not None and loopback.startswith("lo")
    assert interface_holding("localhost") == loopback  # names are resolved first
    assert interface_holding("198.51.100.77") is None  # TEST-NET-2: documentation only
