"""Checkpoints and final weights as safetensors: tensors plus JSON metadata, never pickle.

A checkpoint holds the model, the optimizer state, the RNG state and the exact position
(epoch, batch within it, step), so a resumed attempt continues as if never interrupted.
Final weights hold the model's state_dict plus the spec and data shapes needed to rebuild it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from node_runtime.training.context import JobError
from shared.errors import ApiError
from shared.jobspec import known_data_info, parse_job_spec
from shared.model_shapes import expected_state_shapes
from shared.safetensors_check import CHECKPOINT_FORMAT, WEIGHTS_FORMAT, digest_bytes, spec_fingerprint

# The formats and the spec fingerprint live in shared/ because the gateway checks uploads with them too.
__all__ = ["CHECKPOINT_FORMAT", "WEIGHTS_FORMAT", "Position", "Snapshot", "encode_checkpoint", "encode_weights",
           "load_trained_model", "read_metadata", "restore_checkpoint", "snapshot_checkpoint", "spec_fingerprint",
           "state_digests"]


@dataclass
class Position:
    """Where a run stands: ``epoch`` counts finished epochs, ``batch`` finished batches of the next one."""

    epoch: int = 0
    batch: int = 0
    step: int = 0


@dataclass
class Snapshot:
    """A training state copied off the live model and optimizer (CPU tensors that training no longer
    touches) with its metadata: :meth:`encode` may then run on another thread while training goes on."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def encode(self) -> bytes:
        return safetensors.torch.save(self.tensors, metadata=self.metadata)


def snapshot_checkpoint(spec: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                        position: Position, metrics: dict[str, Any], device: torch.device, *,
                        threads: int | None = None, device_kind: str = "", data_digest: str = "",
                        data_info: dict[str, Any] | None = None) -> Snapshot:
    """Copy the full training state: the copy (a memcpy, or one device-to-host transfer) is all the
    training thread pays for a checkpoint; see ``encode_checkpoint`` for the arguments."""
    tensors = {f"model/{name}": value for name, value in model.state_dict().items()}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value  # e.g. an int step, a None momentum buffer
    tensors["rng/cpu"] = torch.get_rng_state()
    if device.type == "cuda":  # dropout on the GPU draws from the device's own generator
        tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
    metadata = {"format": CHECKPOINT_FORMAT, "fingerprint": spec_fingerprint(spec),
                "position": json.dumps(asdict(position)), "optimizer_scalars": json.dumps(scalars),
                "metrics": json.dumps(metrics), **_provenance(threads, device_kind, data_digest)}
    info = data_info if data_info is not None else known_data_info(spec["dataset"])
    if info is not None:
        metadata["data_info"] = json.dumps(info, sort_keys=True)
    return Snapshot(_storable(tensors), metadata)


def encode_checkpoint(spec: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                      position: Position, metrics: dict[str, Any], device: torch.device, *,
                      threads: int | None = None, device_kind: str = "", data_digest: str = "",
                      data_info: dict[str, Any] | None = None) -> bytes:
    """Serialize the full training state to safetensors bytes.

    ``threads``, ``device_kind`` and ``data_digest`` record how the state was computed (a replay needs
    the same thread count to be bitwise equal); ``data_info`` is the loaded data's shape record, which
    the gateway needs to check a user dataset's checkpoint (a shipped dataset's is known without it).
    """
    return snapshot_checkpoint(spec, model, optimizer, position, metrics, device, threads=threads,
                               device_kind=device_kind, data_digest=data_digest, data_info=data_info).encode()


def state_digests(data: bytes) -> dict[str, str]:
    """The ``weights`` and ``optimizer`` digests of safetensors bytes, exactly as the gateway computes them
    (``shared.safetensors_check``): what a node commits to when it uploads them."""
    digest = digest_bytes(data)
    return {"weights": digest.weights, "optimizer": digest.optimizer}


def restore_checkpoint(data: bytes, spec: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                       device: torch.device) -> tuple[Position, dict[str, Any]]:
    """Load a checkpoint into model, optimizer and RNG; return its position and last metrics."""
    try:
        metadata = read_metadata(data)
    except ValueError as error:
        raise JobError(f"the checkpoint to resume from is damaged: {error}") from error
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise JobError("the checkpoint to resume from is not a CyxWiz training checkpoint")
    if metadata.get("fingerprint") != spec_fingerprint(spec):
        raise JobError("the checkpoint to resume from was made for a different model, dataset or settings")
    try:
        tensors = safetensors.torch.load(data)
        model.load_state_dict({k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")})
        scalars = json.loads(metadata["optimizer_scalars"])
        state: dict[int, dict[str, Any]] = {int(index): dict(values) for index, values in scalars.items()}
        for key, value in tensors.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/", 2)
                state.setdefault(int(index), {})[name] = value
        # the spec, not the checkpoint, decides hyperparameters: keep the live param_groups
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
        torch.set_rng_state(tensors["rng/cpu"])
        if "rng/cuda" in tensors and device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng/cuda"], device)
        position = Position(**json.loads(metadata["position"]))
        metrics: dict[str, Any] = json.loads(metadata["metrics"])
    except (KeyError, ValueError, RuntimeError, TypeError, safetensors.SafetensorError) as error:
        raise JobError(f"the checkpoint to resume from is damaged or does not fit this model: {error}") from error
    return position, metrics


def encode_weights(spec: dict[str, Any], info: dict[str, Any], model: nn.Module, *, threads: int | None = None,
                   device_kind: str = "", data_digest: str = "") -> bytes:
    """The final model as safetensors bytes, with what ``load_trained_model`` needs to rebuild it
    (and how it was computed, as in ``encode_checkpoint``)."""
    metadata = {"format": "pt", "cyxwiz_format": WEIGHTS_FORMAT,
                "spec": json.dumps(spec, sort_keys=True), "data_info": json.dumps(info, sort_keys=True),
                **_provenance(threads, device_kind, data_digest)}
    return safetensors.torch.save(_storable(model.state_dict()), metadata=metadata)


def load_trained_model(path_or_bytes: str | Path | bytes) -> nn.Module:
    """Rebuild the model described in a ``model.safetensors`` file's metadata and load its weights.

    The model is built from torch modules (no Triton needed), on the CPU, in eval mode. The stored spec
    is validated as a submitted one is (``shared.jobspec.parse_job_spec``) and every tensor is checked
    against it before anything is built, so any malformed, tampered or damaged file (not safetensors,
    broken metadata, an impossible model, missing, extra or misshapen tensors, NaN or infinite weights)
    raises one ``ValueError`` saying what is wrong. Nothing in the file is executed.
    """
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    spec, info, weights = _read_trained_model(data)
    from node_runtime.training.models import build_model  # models imports nothing from here; avoids a cycle

    try:
        model = build_model(spec, info)
        model.load_state_dict(weights)
    except (RuntimeError, ValueError, KeyError, TypeError, JobError) as error:  # checked above: a last guard
        raise ValueError(f"not a usable CyxWiz model file: {error}") from error
    return model.eval()


def _read_trained_model(data: bytes) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """The stored spec, data info and weights of a ``model.safetensors``, each checked."""
    metadata = read_metadata(data)
    if metadata.get("cyxwiz_format") != WEIGHTS_FORMAT:
        raise ValueError("not a CyxWiz model file: its metadata lacks the spec to rebuild the model")
    try:
        raw_spec, info = json.loads(metadata["spec"]), json.loads(metadata["data_info"])
    except (KeyError, ValueError) as error:
        raise ValueError(f"the model file's metadata is damaged: {error}") from error
    try:
        spec = parse_job_spec(raw_spec)
        known = known_data_info(spec["dataset"])
        if not isinstance(info, dict) or info.get("task") not in ("classification", "regression", "lm") or (
                known is not None and info != known):
            raise ValueError("its data_info does not describe the spec's dataset")
        expected = expected_state_shapes(spec, info)
    except ApiError as error:
        raise ValueError(f"the model file's spec is not valid: {error.field or 'spec'}: {error.message}") from error
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"the model file's metadata is not valid: {error}") from error
    try:
        weights = safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, RuntimeError) as error:
        raise ValueError(f"not a readable safetensors file: {error}") from error
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        raise ValueError(f"the model file's tensors do not fit its spec: "
                         f"{'missing ' + repr(missing[0]) if missing else 'unexpected ' + repr(extra[0])}")
    for name, shape in expected.items():
        tensor = weights[name]
        if tuple(tensor.shape) != shape or tensor.dtype != torch.float32:
            raise ValueError(f"tensor {name!r} is {tensor.dtype} of shape {tuple(tensor.shape)}; the spec's model "
                             f"has float32 of shape {shape}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"tensor {name!r} holds NaN or infinite values")
    return spec, info, weights


def read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (read from the header: 8-byte length, then JSON)."""
    if len(data) < 8:
        raise ValueError("the safetensors data is truncated")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ValueError("the safetensors header is truncated")
    try:
        header = json.loads(data[8:8 + length])
    except ValueError as error:
        raise ValueError(f"the safetensors header is not valid JSON: {error}") from error
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return {str(key): str(value) for key, value in metadata.items()}


def _provenance(threads: int | None, device_kind: str, data_digest: str) -> dict[str, str]:
    # read back by shared.safetensors_check.check_checkpoint: "" where the node did not say
    return {"threads": "" if threads is None else str(threads), "device_kind": device_kind,
            "torch": str(torch.__version__), "data": data_digest}


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous CPU tensors that share no storage with each other
    return {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in tensors.items()}
