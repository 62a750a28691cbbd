"""A verification task inside a job process: replay one segment of another node's training and report
what came out, for an audit (docs/verification.md).

The replay starts from the segment's first state (a kept checkpoint, or the seed's initial weights),
trains with the trainer's thread count up to the segment's last state, and reports the digests of the
result before it ever sees the trainer's bytes; only when they differ does the control plane hand it
the trainer's bytes to measure how far apart the two are.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from node_runtime.api import STOP_CODES, ApiRefused, ApiUnavailable, JobApi
from node_runtime.job_control import JobControl, JobLaunch, StopReason

log = logging.getLogger("cyxwiz.node.job")
FAR = 1e30  # "not comparable" (other tensors, or weights that moved where the trainer's did not)


class ReplayAttempt:
    """One attempt of one verification task."""

    def __init__(self, launch: JobLaunch, control: JobControl, api: JobApi) -> None:
        self.launch, self.control, self.api = launch, control, api
        self.segment: dict[str, Any] = launch.segment or {}
        self.name = f"verification {launch.task_id} (job {launch.job_id})"
        self.settled = False

    def run(self) -> None:
        from node_runtime.training import JobError, TrainingContext, run_training  # torch loads here

        segment = self.segment
        try:
            start = None
            if segment.get("from_artifact"):
                start = self.api.download(segment["from_artifact"], give_up=self._abandoned)
                if start is None:
                    self._report({"phase": "failed", "error": "the checkpoint to start from is gone"})
                    return
        except ApiRefused as refusal:
            self._refused(refusal)
            return
        except ApiUnavailable:
            return
        ctx = TrainingContext(
            report=lambda _: self.control.mark_step(), should_stop=self._should_stop,
            save_checkpoint=lambda _: None, initial_checkpoint=start, device=self.launch.device,
            cpu_threads=segment.get("threads") or self.launch.torch_threads,
            stop_at_step=None if segment.get("to_final") else int(segment["to_step"]), replay=True,
            data_root=None, allow_http=self.launch.allow_http, dataset_allow_nets=self.launch.dataset_allow_nets,
            dataset_timeout_s=self.launch.dataset_timeout_s, dataset_min_rate_bps=self.launch.dataset_min_rate_bps,
            max_dataset_mb=self.launch.max_dataset_mb)
        log.info("%s: replaying steps %s-%s with %s thread(s)", self.name, segment.get("from_step"),
                 segment.get("to_step"), ctx.cpu_threads)
        try:
            result = run_training(self.launch.spec, ctx)
        except JobError as error:  # the trainer says it trained this; here it cannot: a mismatch
            self._report({"phase": "digest", "weights": f"error: {error}"[:300]})
            return
        except Exception as error:  # noqa: BLE001 - this node's trouble: another verifier gets the task
            log.exception("%s crashed", self.name)
            self._report({"phase": "failed", "error": f"{type(error).__name__}: {error}"})
            return
        if result.status == "stopped":
            if self.control.stop_reason == StopReason.DRAIN:
                self._report({"phase": "handback"})
            return
        from node_runtime.training.checkpoints import read_metadata, state_digests

        mine = result.weights if segment.get("to_final") else result.checkpoint
        assert mine is not None
        digests = state_digests(mine)
        answer = self._report({
            "phase": "digest", "weights": digests["weights"],
            "optimizer": "" if segment.get("to_final") else digests["optimizer"],
            "data": read_metadata(mine).get("data", ""),
            "samples_per_s": _finite(result.metrics.get("samples_per_s"))})
        if not answer or answer.get("outcome") != "compare":
            return
        try:
            theirs = self.api.download(answer["artifact"], give_up=self._abandoned)
        except (ApiRefused, ApiUnavailable) as exc:
            log.info("%s: cannot read the trainer's state to compare: %s", self.name, exc)
            return
        distance = FAR if theirs is None else weight_distance(mine, theirs, result.start_weights or {})
        log.info("%s: replay differs from the trainer's bytes; distance %.3g", self.name, distance)
        self._report({"phase": "distance", "distance": distance})

    def _should_stop(self) -> bool:
        self.control.mark_step()
        return self.control.stop_reason != StopReason.NONE

    def _abandoned(self) -> bool:
        return self.control.stop_reason >= StopReason.CANCEL

    def _report(self, body: dict[str, Any]) -> dict[str, Any] | None:
        if self._abandoned():
            return None
        try:
            answer = self.api.retrying(lambda: self.api.report_verification(self.launch.task_id, body),
                                       give_up=self._abandoned)
        except ApiRefused as refusal:
            self._refused(refusal)
            return None
        except ApiUnavailable:
            return None
        self.settled = True
        log.info("%s: reported %s: %s", self.name, body["phase"], answer.get("outcome"))
        return answer

    def _refused(self, refusal: ApiRefused) -> None:
        self.settled = True  # stale or gone: nothing more to do; the control plane has moved on
        if refusal.code in STOP_CODES or refusal.status in (401, 403, 404, 409):
            self.control.request_stop(StopReason.LOST)
        log.info("%s: the control plane refused: %s", self.name, refusal)


def weight_distance(mine: bytes, theirs: bytes, start: dict[str, Any]) -> float:
    """How far the replay's weights are from the trainer's, relative to how far training moved them in
    this segment: ||mine - theirs|| / ||theirs - start|| (proof-of-learning's reproduction error, scaled
    by the update). Other tensor names or shapes are not comparable: FAR."""
    import safetensors.torch
    import torch

    a, b = _model_tensors(safetensors.torch.load(mine)), _model_tensors(safetensors.torch.load(theirs))
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return FAR
    diff = update = 0.0
    for name, tensor in a.items():
        other = b[name].float()
        diff += float(torch.sum((tensor.float() - other) ** 2))
        base = start.get(name)
        if base is not None and base.shape == other.shape:
            update += float(torch.sum((other - base.float()) ** 2))
    if not math.isfinite(diff):
        return FAR
    if update == 0.0:
        return 0.0 if diff == 0.0 else FAR
    return min(FAR, math.sqrt(diff / update))


def _model_tensors(tensors: dict[str, Any]) -> dict[str, Any]:
    if any(name.startswith("model/") for name in tensors):
        return {name.removeprefix("model/"): t for name, t in tensors.items() if name.startswith("model/")}
    return tensors


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
