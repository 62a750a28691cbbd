"""The training loop: one job's model trained on its dataset, with progress, checkpoints and stop.

Deterministic for a given spec on the CPU: the initial weights come from the seed, the batch
order from (seed, epoch), dropout from the global generator seeded once and saved in checkpoints.
With ``ctx.distributed`` the same loop runs on every rank of a data-parallel run (``distributed``):
each trains on its shard of every global batch, and the ranks agree on when to report, checkpoint and
stop; rank 0 alone reports and writes checkpoints, which hold the plain model, so they resume on any
number of ranks.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from node_runtime.training import distributed, layers
from node_runtime.training.checkpoints import (
    Position,
    Snapshot,
    encode_weights,
    restore_checkpoint,
    snapshot_checkpoint,
)
from node_runtime.training.context import JobError, TrainingContext, TrainingResult
from node_runtime.training.datasets import Dataset, TextDataset, load_dataset
from node_runtime.training.models import build_model
from node_runtime.training.user_data import DatasetLimits
from shared.errors import ApiError
from shared.jobspec import parse_job_spec
from shared.safetensors_check import total_steps

log = logging.getLogger("cyxwiz.train")  # the job's log (docs/logs.md): a summary line per epoch


def run_training(spec: dict[str, Any], ctx: TrainingContext) -> TrainingResult:
    """Train the model of a job spec (as ``shared.jobspec.parse_job_spec`` normalizes it) on ``ctx.device``.

    Resumes from ``ctx.initial_checkpoint`` when given. Returns status "completed", or "stopped"
    as soon as ``ctx.should_stop()`` turns True. Raises ``JobError`` for failures the job causes
    (unusable data, shapes that do not fit, a loss that turns NaN or infinite).

    With ``ctx.distributed`` over two or more ranks, every rank loads the data and builds the model
    first, then joins the others (``RendezvousTimeout`` if they do not all come within its timeout_s)
    and trains its shard; ``PeerLost`` if a peer goes away (a rank whose shard's loss turns NaN raises
    ``JobError`` and leaves, so its peers raise ``PeerLost``). Ranks other than 0 never call ``report`` or
    ``save_checkpoint``, and their result has the same status and metrics but no weights (``b""``).
    """
    try:  # idempotent on a normalized spec; fills defaults in a raw one and re-checks it on this node
        spec = parse_job_spec(spec)
    except ApiError as error:
        raise JobError(f"{error.field or 'spec'}: {error.message}") from error
    device = torch.device(ctx.device)
    if device.type == "cpu":
        torch.set_num_threads(ctx.cpu_threads or _default_cpu_threads())
        # Adam's second moments of rarely-seen rows (unused byte values) decay into subnormal floats,
        # which x86 CPUs process ~100x slower: a tiny transformer went from 4 s to 33 s without this
        torch.set_flush_denormal(True)
    training = spec["training"]
    torch.manual_seed(training["seed"])  # seeds CUDA too; dropout is the only consumer of these generators
    use_kernels = layers.use_triton_kernels(training["kernels"], device)
    data = load_dataset(spec, ctx.data_root, ctx.allow_http, DatasetLimits.of(ctx))
    model = build_model(spec, data.info, use_kernels=use_kernels).to(device)
    optimizer = layers.make_optimizer(model, spec, use_kernels)
    if ctx.distributed is None or ctx.distributed.world_size == 1:
        return _Run(spec, ctx, data, model, optimizer, device, use_kernels).train()
    with distributed.join(ctx.distributed, device) as gang:
        return _Run(spec, ctx, data, model, optimizer, device, use_kernels, gang).train()


def device_kind(device: torch.device) -> str:
    """What an audit must replay on to compare bitwise: ``cpu``, or the GPU's name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def data_digest(data: Dataset) -> str:
    """SHA-256 of the training split's tensors: binds a commitment to the bytes trained on (the order
    is a function of training.seed and the epoch, in the spec)."""
    digest = hashlib.sha256()
    tensors = [data.train_tokens] if isinstance(data, TextDataset) else [data.train_x, data.train_y]
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().data.cast("B"))
    return digest.hexdigest()


def reads_every_step(device: torch.device) -> bool:
    """Whether the loop reads each step's loss back before its backward pass: on the CPU (free, and a NaN
    is caught before it reaches the weights), not on a GPU, where that sync would stall the queue of
    kernels each step; there the sums are read at report, checkpoint and epoch boundaries."""
    return device.type != "cuda"


def _default_cpu_threads() -> int:
    """Half the cores this process may use: torch's threads wait for each other at every op, so one
    descheduled thread stalls them all. On a busy 2-core host the digits MLP took 13 s with 2 threads
    and 0.4 s with 1; the small transformer 8.8 s against 5.8 s. The node runtime needs a core too."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, usable // 2)


def _summary(where: str, metrics: dict[str, Any]) -> str:
    """``epoch 3/10: loss 0.3100, accuracy 0.9100, val_loss 0.3500, val_accuracy 0.9000, 5120 samples/s``"""
    parts = [f"{name} {metrics[name]:.4f}" for name in ("loss", "accuracy", "val_loss", "val_accuracy",
                                                        "test_loss", "test_accuracy")
             if isinstance(metrics.get(name), float)]
    if "samples_per_s" in metrics:
        parts.append(f"{metrics['samples_per_s']:.0f} samples/s")
    if "tokens_per_s" in metrics:
        parts.append(f"{metrics['tokens_per_s']:.0f} tokens/s")
    return f"{where}: " + ", ".join(parts)


@dataclass
class _Totals:
    """Sums over the batches of one epoch (or one report window)."""

    loss_sum: float = 0.0  # loss times the number of predictions
    correct: int = 0
    predictions: int = 0  # samples, or tokens for a language model
    samples: int = 0
    seconds: float = 0.0  # time spent in training steps, so validation does not dilute throughput


class _CheckpointWriter:
    """Encodes checkpoint snapshots and hands the bytes to ``save`` on a thread of its own, so a step
    pays only for copying the state. One snapshot at a time: a new one waits for the one before, which
    bounds memory to one extra copy and keeps every due checkpoint (none is silently skipped). A write
    that fails costs a resume point, not the job: it is logged and kept in ``last_error``."""

    def __init__(self, save: Callable[[bytes], None]) -> None:
        self.save = save
        self.last_error: Exception | None = None  # of the last write; None once one succeeds
        self._changed = threading.Condition()
        self._pending: Snapshot | None = None
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, snapshot: Snapshot) -> None:
        with self._changed:
            while self._pending is not None or self._busy:
                self._changed.wait()
            self._pending = snapshot
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_forever, name="checkpoint-writer", daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def idle(self) -> bool:
        """Whether a snapshot submitted now would be taken at once."""
        with self._changed:
            return self._pending is None and not self._busy

    def wait(self) -> None:
        """Return once every submitted checkpoint has been handed to ``save``."""
        with self._changed:
            while self._pending is not None or self._busy:
                self._changed.wait()

    def close(self) -> None:
        """Wait for every submitted checkpoint, then end the thread."""
        with self._changed:
            while self._pending is not None or self._busy:
                self._changed.wait()
            self._closed = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _write_forever(self) -> None:
        while True:
            with self._changed:
                while self._pending is None and not self._closed:
                    self._changed.wait()
                if self._pending is None:
                    return
                snapshot, self._pending, self._busy = self._pending, None, True
            error = None
            try:
                self.save(snapshot.encode())
            except Exception as failed:  # a checkpoint that cannot be written costs a resume point, not the job
                log.exception("a checkpoint could not be written (position %s)", snapshot.metadata["position"])
                error = failed
            finally:
                with self._changed:
                    self.last_error, self._busy = error, False
                    self._changed.notify_all()


class _Run:
    """The state of one run between steps.

    The step's loss and accuracy are summed on the device and read back (one host sync) at report,
    checkpoint and epoch boundaries on a GPU, so steps queue up without waiting for each other; on the
    CPU, where reading a scalar costs nothing, each step's loss is checked before its backward pass, so
    a loss that turns NaN is caught before it reaches the weights, and its sums are read once it is done.

    In a distributed run (``gang``) the sums read back are this rank's; they are added up over the
    ranks (one all-reduce) where metrics are needed: reports, checkpoints and the result.
    """

    def __init__(self, spec: dict[str, Any], ctx: TrainingContext, data: Dataset, model: nn.Module,
                 optimizer: torch.optim.Optimizer, device: torch.device, use_kernels: bool,
                 gang: distributed.Gang | None = None) -> None:
        self.spec, self.ctx, self.data, self.model, self.optimizer, self.device = (
            spec, ctx, data, model, optimizer, device)
        self.training = spec["training"]
        self.task = data.info["task"]
        self.cross_entropy = layers.cross_entropy(use_kernels) if self.task != "regression" else None
        self.batches_per_epoch = data.batches_per_epoch(self.training["batch_size"])
        # epochs x batches per epoch, or training.max_steps, whichever ends first: the schedule follows it
        self.total_steps = total_steps(spec, self.batches_per_epoch) or 0
        self.position, self.val_metrics, self.epoch_totals = Position(), {}, _Totals()
        self.test_metrics: dict[str, float] = {}
        if ctx.initial_checkpoint is not None:
            self.position, saved = restore_checkpoint(ctx.initial_checkpoint, spec, model, optimizer, device)
            self.val_metrics = saved["val"]
            # mid-epoch, that epoch's running loss and accuracy go on; after the last epoch (a stop in the
            # test evaluation) they are the result's; at other epoch starts they are zeros
            self.epoch_totals = _Totals(**saved.get("epoch_totals", {}))
        self.saved_position = Position(**asdict(self.position))
        # what a replay must match (recorded in every checkpoint and the final weights)
        self.threads = torch.get_num_threads() if device.type == "cpu" else None
        self.device_kind, self.data_digest = device_kind(device), data_digest(data)
        self.start_weights = ({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                              if ctx.replay else None)
        self.window, self.steps_since_report = _Totals(), 0
        # steps not yet read back from the device: [loss x predictions, correct] and the host-side counts
        self.sync_every_step = reads_every_step(device)
        self.unread = torch.zeros(2, dtype=torch.float64, device=device)
        self.unread_steps, self.unread_predictions, self.unread_samples = 0, 0, 0
        self.writer = _CheckpointWriter(ctx.save_checkpoint)
        self.stop_reason = 0  # why the last stop check said stop (0: it did not)
        # a distributed run trains the DDP-wrapped model; the plain one validates and is saved
        self.gang, self.leads = gang, gang is None or gang.leads
        self.trained = model if gang is None else gang.wrap(model)
        self.unshared, self.unshared_steps = _Totals(), 0  # this rank's sums not yet added up over the ranks
        self.window_rates, self.epoch_rates = self._rank_totals(), self._rank_totals()  # each rank's throughput

    def train(self) -> TrainingResult:
        self.model.train()
        # the clocks start here, after DDP's first broadcast (which waits for the slowest rank to arrive)
        self.last_report_at = self.last_checkpoint_at = time.monotonic()
        self.timer = time.perf_counter()  # the training time not yet added to the totals starts here
        try:
            return self._train()
        finally:
            self.writer.close()  # every checkpoint is in the executor's hands before the result is
            self.trained = self.model  # DDP must go before its process group does (distributed.join)

    def _train(self) -> TrainingResult:
        batch_size, seed = self.training["batch_size"], self.training["seed"]
        stop_at = self.ctx.stop_at_step
        if stop_at is not None and self.position.step >= stop_at:
            return self._segment()
        while self.position.step < self.total_steps:
            epoch = self.position.epoch
            for inputs, targets in self.data.train_batches(seed, epoch, batch_size, self.position.batch):
                if self._stop_requested():
                    return self._stop()
                self._step(inputs, targets)
                if stop_at is not None and self.position.step >= stop_at:
                    return self._segment()
                if self.position.step >= self.total_steps:
                    break  # training.max_steps ends it mid-epoch
                # the epoch's end checkpoints after validation
                report, checkpoint = self._agree(self._report_due(), self.position.batch < self.batches_per_epoch
                                                 and self._checkpoint_due())
                if report:
                    self._report()
                if checkpoint:
                    self._save_checkpoint()
            if self.position.batch < self.batches_per_epoch:
                break  # ended mid-epoch: validated below
            # a stop during the validation keeps (epoch, last batch): a resume validates this epoch again
            if not self._end_of_epoch(self._epoch_name()):
                return self._stop()
            self.position = Position(epoch + 1, 0, self.position.step)
            if self.position.step < self.total_steps:  # the last epoch's state is the result itself
                self.epoch_totals, self.epoch_rates = _Totals(), self._rank_totals()
                if self._agree(False, self._checkpoint_due())[1]:
                    self._save_checkpoint()
        if self.position.batch:  # a step budget ended mid-epoch, or a resume of a stopped validation
            whole = self.position.batch == self.batches_per_epoch
            if not self._end_of_epoch(self._epoch_name() if whole else f"step {self.position.step}/{self.total_steps}"):
                return self._stop()
            if whole:
                self.position = Position(self.position.epoch + 1, 0, self.position.step)
        if self._has_test_split():
            test = self._evaluate(self.data.test_batches(batch_size), "test_")
            if test is None:
                return self._stop()
            self.test_metrics = test
            log.info("%s", _summary("test", test))
        return self._result("completed")

    def _end_of_epoch(self, where: str) -> bool:
        """Validate, report and log where the run stands; False if should_stop fired meanwhile."""
        validation = self._evaluate(self.data.val_batches(self.training["batch_size"]), "val_")
        if validation is None:
            return False
        self.val_metrics = validation
        self._report()
        if self.leads:
            log.info("%s", _summary(where, self._metrics(self.epoch_totals, self.epoch_rates)))
        return True

    def _epoch_name(self) -> str:
        epochs = self.training["epochs"]
        return f"epoch {self.position.epoch + 1}" + (f"/{epochs}" if epochs else "")

    def _has_test_split(self) -> bool:
        return any(True for _ in self.data.test_batches(self.training["batch_size"]))

    def _stop_requested(self) -> bool:
        """Whether to stop before the next step or validation batch: should_stop fired here, or in a
        distributed run on any rank (the same answer on every rank, and ``stop_reason`` the largest)."""
        self.stop_reason = (self._own_stop_reason() if self.gang is None
                            else self.gang.stop_reason(self._own_stop_reason))
        return self.stop_reason > 0

    def _own_stop_reason(self) -> int:
        if not self.ctx.should_stop():
            return 0
        return max(1, self.ctx.stop_reason()) if self.ctx.stop_reason is not None else 1

    def _agree(self, report: bool, checkpoint: bool) -> tuple[bool, bool]:
        """Whether to report and to checkpoint now (in a distributed run, as rank 0 decides for all)."""
        return (report, checkpoint) if self.gang is None else self.gang.agree(self._own_stop_reason(), report,
                                                                                checkpoint)

    def _report_due(self) -> bool:
        return bool(self.steps_since_report >= self.training["progress_every_steps"]
                    or time.monotonic() - self.last_report_at >= self.training["progress_every_s"])

    def _checkpoint_due(self) -> bool:
        """``min_interval_s`` has passed since the last checkpoint. In a distributed run also the writer is
        free: rank 0 waiting on a slow upload would stall every rank, up to their collectives' timeout."""
        checkpointing = self.training["checkpoint"]
        return bool(checkpointing["enabled"] and time.monotonic() - self.last_checkpoint_at
                    >= checkpointing["min_interval_s"] and (self.gang is None or self.writer.idle()))

    def _step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        weight = 1.0
        if self.gang is not None:
            inputs, targets, weight = self.gang.shard(inputs, targets)
            self.gang.seed_dropout(self.training["seed"], self.position.step)
        inputs = inputs.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        learning_rate = self._learning_rate(self.position.step)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            outputs = self.trained(inputs)
            # an empty shard (a last batch with fewer rows than ranks) still joins the gradients' all-reduce
            loss = self._loss(outputs, targets) if len(targets) else outputs.sum() * 0.0
        predictions = targets.numel() if self.task == "lm" else len(targets)
        self.unread += torch.stack([loss.detach().double() * predictions, self._correct(outputs, targets).double()])
        self.unread_steps += 1
        self.unread_predictions += predictions
        self.unread_samples += len(targets)
        if self.sync_every_step:  # on the CPU a NaN is caught before it reaches the weights
            value = float(loss.detach())
            if not math.isfinite(value):
                raise self._not_finite(value, self.position.step + 1, self.position.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        if self.gang is None:
            torch.autograd.backward(loss)
        else:  # DDP averages the ranks' gradients during this pass: weighted, the average is the global mean's
            with self.gang.collective("the gradients' all-reduce"):
                torch.autograd.backward(loss * weight)
        if self.training["grad_clip"] > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.training["grad_clip"])
        self.optimizer.step()
        self.position.batch += 1
        self.position.step += 1
        self.steps_since_report += 1
        if self.sync_every_step:
            self._read_back()

    def _read_back(self) -> None:
        """Add the unread steps' sums (one host sync) and the training time since the last read to the
        epoch's and the report window's totals; a NaN or infinite loss fails the job here."""
        if not self.unread_steps:
            return
        loss_sum, correct = self.unread.tolist()
        now = time.perf_counter()
        if not math.isfinite(loss_sum):
            raise self._not_finite(loss_sum, self.position.step - self.unread_steps + 1, self.position.step)
        for totals in (self.epoch_totals, self.window) if self.gang is None else (self.unshared,):
            totals.loss_sum += loss_sum
            totals.correct += int(correct)
            totals.predictions += self.unread_predictions
            totals.samples += self.unread_samples
            totals.seconds += now - self.timer
        self.unshared_steps += self.unread_steps
        self.unread.zero_()
        self.unread_steps, self.unread_predictions, self.unread_samples, self.timer = 0, 0, 0, now

    def _not_finite(self, loss: float, first: int, last: int) -> JobError:
        at = f"at step {last}" if first == last else f"between steps {first} and {last}"
        return JobError(f"the loss became {loss} {at} (epoch {self.position.epoch + 1}): lower "
                        "training.learning_rate or check the data")

    def _share_totals(self) -> None:
        """Read back; in a distributed run also add up the ranks' sums since the last time (one all-reduce,
        skipped on every rank alike when no step was taken since), so that every rank holds the global
        totals and each rank's throughput. The time is this rank's: the ranks step in lockstep."""
        self._read_back()
        if self.gang is None or not self.unshared_steps:
            return
        own = self.unshared
        (loss_sum, correct, predictions, samples), rates = self.gang.add_up_with_rates(
            [own.loss_sum, own.correct, own.predictions, own.samples], own.samples, own.seconds)
        for totals in (self.epoch_totals, self.window):
            totals.loss_sum += loss_sum
            totals.correct += int(correct)
            totals.predictions += int(predictions)
            totals.samples += int(samples)
            totals.seconds += own.seconds
        for by_rank in (self.epoch_rates, self.window_rates):
            for totals, (rank_samples, rank_seconds) in zip(by_rank, rates, strict=True):
                totals.samples += int(rank_samples)
                totals.seconds += rank_seconds
        self.unshared, self.unshared_steps = _Totals(), 0

    def _rank_totals(self) -> list[_Totals]:
        return [_Totals() for _ in range(self.gang.world_size if self.gang is not None else 0)]

    def _loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.cross_entropy is None:
            return F.mse_loss(outputs.float(), targets)
        loss: torch.Tensor = self.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))
        return loss

    def _correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.task == "regression":
            return torch.zeros((), device=outputs.device)
        return (outputs.detach().argmax(-1) == targets).sum()

    def _learning_rate(self, step: int) -> float:
        base, warmup = self.training["learning_rate"], self.training["warmup_steps"]
        if step < warmup:
            return float(base * (step + 1) / warmup)
        if self.training["lr_schedule"] == "cosine":  # decays to a tenth of the base rate at the last step
            progress = (step - warmup) / max(1, self.total_steps - warmup)
            return float(base * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress)))))
        return float(base)

    def _evaluate(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                  prefix: str) -> dict[str, float] | None:
        """Loss (and accuracy) over held-out batches, as ``{prefix}loss``; None when should_stop fired."""
        self._read_back()  # the time below is not training time
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        predictions = 0
        self.model.eval()
        try:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                 enabled=self.device.type == "cuda"):
                for inputs, targets in batches:
                    if self._stop_requested():
                        return None
                    if self.gang is not None:  # each rank validates its shard of every held-out batch
                        inputs, targets, _ = self.gang.shard(inputs, targets)
                        if not len(targets):
                            continue
                    inputs, targets = inputs.to(self.device), targets.to(self.device)
                    outputs = self.model(inputs)
                    count = targets.numel() if self.task == "lm" else len(targets)
                    loss_sum += self._loss(outputs, targets).double() * count
                    correct += self._correct(outputs, targets).double()
                    predictions += count
        finally:
            self.model.train()
            self.timer = time.perf_counter()
        total_loss, total_correct = torch.stack([loss_sum, correct]).tolist()
        if self.gang is not None:
            total_loss, total_correct, shared_predictions = self.gang.add_up([total_loss, total_correct, predictions])
            predictions = int(shared_predictions)
        if predictions == 0:
            return {}
        metrics = {f"{prefix}loss": total_loss / predictions}
        if self.task != "regression":
            metrics[f"{prefix}accuracy"] = total_correct / predictions
        return metrics

    def _metrics(self, totals: _Totals, by_rank: list[_Totals]) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if self.epoch_totals.predictions:
            metrics["loss"] = self.epoch_totals.loss_sum / self.epoch_totals.predictions
            if self.task != "regression":
                metrics["accuracy"] = self.epoch_totals.correct / self.epoch_totals.predictions
        metrics.update(self.val_metrics)
        metrics.update(self.test_metrics)
        metrics["samples_per_s"] = totals.samples / totals.seconds if totals.seconds > 0 else 0.0
        for rank, own in enumerate(by_rank):  # a distributed run: the whole run's rate above, each rank's here
            metrics[f"samples_per_s/rank{rank}"] = own.samples / own.seconds if own.seconds > 0 else 0.0
        if self.task == "lm":
            metrics["tokens_per_s"] = totals.predictions / totals.seconds if totals.seconds > 0 else 0.0
        metrics["gpu_memory_mb"] = (round(torch.cuda.max_memory_allocated(self.device) / 2**20)
                                    if self.device.type == "cuda" else 0)
        return metrics

    def _report(self) -> None:
        self._share_totals()
        if self.leads:
            current_epoch = self.position.epoch + (1 if self.position.batch else 0)
            self.ctx.report({"epoch": max(1, current_epoch), "step": self.position.step,
                             "total_steps": self.total_steps,
                             "metrics": self._metrics(self.window, self.window_rates)})
        self.window, self.window_rates = _Totals(), self._rank_totals()
        self.steps_since_report, self.last_report_at = 0, time.monotonic()

    def _snapshot(self) -> Snapshot:
        self._read_back()  # the epoch's totals go into the checkpoint
        saved = {"val": self.val_metrics, "epoch_totals": asdict(self.epoch_totals)}
        snapshot = snapshot_checkpoint(self.spec, self.model, self.optimizer, self.position, saved, self.device,
                                       data_info=self.data.info, threads=self.threads, device_kind=self.device_kind,
                                       data_digest=self.data_digest)
        self.timer = time.perf_counter()
        return snapshot

    def _save_checkpoint(self) -> None:
        """Copy the state here; encoding and uploading happen off the training thread (rank 0's only)."""
        self._share_totals()  # the epoch's totals go into the checkpoint: every rank's
        if self.leads:
            self.writer.submit(self._snapshot())
        self.saved_position, self.last_checkpoint_at = Position(**asdict(self.position)), time.monotonic()

    def _segment(self) -> TrainingResult:
        """A replay reached its stop: the whole state there, and where it started."""
        result = self._result("segment")
        if self.leads:
            result.checkpoint = self._snapshot().encode()
        return result

    def _stop(self) -> TrainingResult:
        # always keep the exact position on stop (a draining node's job resumes elsewhere), once
        if self.training["checkpoint"]["enabled"] and self.saved_position != self.position:
            self._save_checkpoint()
            self.writer.wait()
            if self.writer.last_error is not None:
                log.error("the checkpoint of step %d could not be written: the job resumes from its last "
                          "checkpoint before that", self.position.step)
        return self._result("stopped")

    def _result(self, status: str) -> TrainingResult:
        self._share_totals()
        weights = encode_weights(self.spec, self.data.info, self.model, threads=self.threads,
                                 device_kind=self.device_kind, data_digest=self.data_digest) if self.leads else b""
        return TrainingResult(status=status, metrics=self._metrics(self.epoch_totals, self.epoch_rates),
                              weights=weights, epoch=self.position.epoch, step=self.position.step,
                              total_steps=self.total_steps, start_weights=self.start_weights,
                              stop_reason=self.stop_reason)
