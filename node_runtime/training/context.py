"""What the executor hands to a training run, what it gets back, the one error the job owns, and the
two a multi-node run raises when the fault lies with another node."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Distributed:
    """This node's place in a data-parallel run over ``world_size`` nodes (``node_runtime.training.distributed``).

    Rank 0 hosts the rendezvous: it calls ``publish_master`` with the port its store listens on; every
    other rank calls ``find_master`` with a deadline in seconds and gets rank 0's ``(host, port)``, or
    ``RendezvousTimeout`` once the deadline passes. ``own_address`` is the address the other nodes reach
    this one at (its registered address); the collectives' traffic is bound to it. ``timeout_s`` bounds
    the rendezvous and every collective, so it is also how long a silent peer takes to be declared lost.
    Only rank 0 calls the context's ``report`` and ``save_checkpoint``; every rank's ``should_stop`` stops
    them all before the same step.
    """

    rank: int
    world_size: int
    own_address: str
    publish_master: Callable[[int], None]
    find_master: Callable[[float], tuple[str, int]]
    timeout_s: float = 120.0


@dataclass
class TrainingContext:
    """The executor's side of one training run.

    ``report`` and ``should_stop`` are called from the training thread; ``report`` must not block: it
    receives ``{"epoch", "step", "total_steps", "metrics"}``. ``should_stop`` turning True (job
    cancelled, node draining) stops the run before the next step; the run then saves one last
    checkpoint of its exact position, so a drained job loses nothing (make ``save_checkpoint`` a no-op
    for a cancelled job if that upload is unwanted). ``save_checkpoint`` receives the encoded bytes on
    the run's checkpoint-writer thread (the training thread only copies the state), one at a time and
    in order, at the first step boundary or epoch end once ``training.checkpoint.min_interval_s`` has
    passed since the last, and on stop; every one has been handed over before ``run_training`` returns.
    """

    report: Callable[[dict[str, Any]], None]
    should_stop: Callable[[], bool]
    save_checkpoint: Callable[[bytes], None]
    initial_checkpoint: bytes | None = None  # from an earlier attempt: resume from it
    data_root: Path | None = None  # operator-allowed directory for local dataset files; None refuses them
    allow_http: bool = False  # operator allows http(s) dataset urls
    dataset_allow_nets: tuple[str, ...] = ()  # private networks dataset urls may reach (operator's choice)
    dataset_timeout_s: float = 600.0  # a dataset download must finish within this ...
    dataset_min_rate_bps: float = 16384.0  # ... and keep at least this average rate
    max_dataset_mb: int = 1024  # downloaded, read and decompressed dataset bytes are capped at this
    device: str = "cpu"  # "cpu" or "cuda[:i]"
    cpu_threads: int | None = None  # torch intra-op threads on CPU; None: half the cores this process may use
    # an audit's replay (docs/verification.md): stop once this many steps are done (None: train to the end)
    # and keep the starting weights, so the replay can be compared with the trainer's
    stop_at_step: int | None = None
    replay: bool = False
    # why should_stop fired, asked only once it has (node_runtime.job_control.StopReason: drain 1, cancel 2,
    # lost 3); a distributed run stops every rank with the largest reason any rank gave. None: reason 1
    stop_reason: Callable[[], int] | None = None
    distributed: Distributed | None = None  # None (or world_size 1): a single-process run


@dataclass
class TrainingResult:
    """The outcome of ``run_training``."""

    status: str  # "completed", "stopped" when should_stop fired, "segment" at a replay's stop_at_step
    metrics: dict[str, Any]  # final metrics: loss, accuracy, val_loss, val_accuracy, samples_per_s, ...
    weights: bytes  # safetensors bytes of the model's state_dict, with the spec and data shapes as metadata;
    # b"" on the ranks > 0 of a distributed run (rank 0's are the run's: every rank holds the same weights)
    epoch: int  # epochs completed
    step: int  # optimizer steps taken, resumed attempts included
    total_steps: int
    checkpoint: bytes | None = None  # status "segment": the full state at stop_at_step
    start_weights: dict[str, Any] | None = None  # replay: the model's tensors where it started
    stop_reason: int = 0  # status "stopped": why (ctx.stop_reason's value; in a distributed run, any rank's largest)


class JobError(Exception):
    """A failure caused by the job itself (bad data, NaN loss, shapes that cannot work): retrying cannot help."""


class RendezvousTimeout(Exception):
    """The process group of a distributed run did not form within ``Distributed.timeout_s``: a peer never
    showed up (or rank 0 never published its port). The fault lies with the absent node, not this one."""


class PeerLost(Exception):
    """A collective of a distributed run failed: another rank's process died, its connection broke, or it
    went silent for longer than ``Distributed.timeout_s``. The fault lies with that peer, not this node."""
