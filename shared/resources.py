"""What a job will need before it runs: its peak memory, estimated from the normalized spec alone.

Pure Python (no torch), like :mod:`shared.model_shapes`, whose shape rules it reuses. Submit puts the
estimate on the job (``resources.estimated_memory_mb``), refuses a job no node of the cluster could
hold (422 naming the field that drives it), and placement gives a job only to a node with that much
memory unreserved. The node enforces it: the job process is killed past the estimate (plus the
framework's own fixed cost, which is the node's to know), and that is the job's fault.

The estimate counts, in fp32 bytes:
- parameters, their gradients, the optimizer's state (AdamW: two moments; SGD: momentum) and one
  serialized copy of weights and optimizer state for checkpoints;
- activations kept for the backward pass for one training batch (and as much again for their
  gradients), including attention scores (heads x context x context per sample), and the logits;
- the dataset in memory (synthetic data is generated in float64 then cast; a ``dataset.url`` counts
  as the most a node downloads, :data:`URL_DATASET_MB`, since its size is known only once fetched);
then adds a margin of :data:`MARGIN`, and :data:`TORCH_MB` for torch itself. It errs
high: a job refused or parked too early costs its user a resubmit, a node killed by a job that outgrew
it costs every tenant on that node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from shared.model_shapes import TEXT_VOCAB_SIZE, check_model_fits, sequential_shapes

FLOAT = 4  # bytes per fp32 value
MARGIN = 1.25
# What a job process holds whatever the job: torch itself once imported (about 220 MiB resident on CPU)
# and what it takes once training starts (allocator arenas, thread pools, oneDNN/MKL scratch, lazily
# loaded kernels: about 150-200 MiB more). Measured by ``python -m load_tests.memory``.
TORCH_MB = 512
URL_DATASET_MB = 1024  # a node downloads and decompresses at most this much of a dataset.url by default
MIB = 1 << 20


@dataclass(frozen=True)
class Estimate:
    """Peak memory of one training run, by part; ``driver`` names the spec field behind the largest."""

    parameters_bytes: int
    activations_bytes: int
    dataset_bytes: int
    driver: str

    @property
    def memory_mb(self) -> int:
        total = self.parameters_bytes + self.activations_bytes + self.dataset_bytes
        return TORCH_MB + math.ceil(total * MARGIN / MIB)

    def parts(self) -> str:
        """The three parts in MiB, for messages."""
        return (f"parameters and optimizer {self.parameters_bytes / MIB:,.0f} MiB, activations "
                f"{self.activations_bytes / MIB:,.0f} MiB, dataset {self.dataset_bytes / MIB:,.0f} MiB")


def estimate(spec: dict[str, Any], info: dict[str, Any] | None) -> Estimate:
    """The estimate for a normalized spec; ``info`` is the data shape (None for user data)."""
    model, training = spec["model"], spec["training"]
    params = check_model_fits(model, info)
    optimizer_copies = {"adam": 2, "adamw": 2, "sgd": 1 if training["momentum"] > 0 else 0}[training["optimizer"]]
    # weights + gradients + optimizer state, and a checkpoint's serialized weights + optimizer state
    parameters = params * FLOAT * (3 + 2 * optimizer_copies)
    batch = training["batch_size"]
    per_sample, activation_driver = _activations_per_sample(model, info)
    activations = 2 * batch * per_sample * FLOAT  # saved for backward, and their gradients
    dataset, dataset_driver = _dataset_bytes(spec["dataset"], info)
    parts = {"model": parameters, activation_driver: activations, dataset_driver: dataset}
    return Estimate(parameters, activations, dataset, max(parts, key=lambda name: parts[name]))


def _activations_per_sample(model: dict[str, Any], info: dict[str, Any] | None) -> tuple[int, str]:
    """fp32 values one sample keeps for the backward pass, and the field that drives them."""
    outputs = _outputs(info)
    kind = model["type"]
    if kind == "mlp":
        features = (info or {}).get("num_features") or 1
        per_layer = 2 + (model["norm"] != "none") + (model["dropout"] > 0)  # linear out, activation, norm, mask
        return features + per_layer * sum(model["hidden"]) + 3 * outputs, "training.batch_size"
    if kind == "cnn":
        return _cnn_activations(model, info, outputs), "training.batch_size"
    if kind == "transformer":
        context, d, d_ff, heads = model["context"], model["d_model"], model["d_ff"], model["n_heads"]
        vocab = (info or {}).get("vocab_size") or TEXT_VOCAB_SIZE
        scores = 2 * heads * context * context  # attention scores and their softmax (the math path keeps both)
        block = context * (10 * d + 2 * d_ff) + scores
        total = context * d + model["n_layers"] * block + 3 * context * vocab
        driver = "model.context" if model["n_layers"] * scores > total / 2 else "training.batch_size"
        return total, driver
    shapes = sequential_shapes(model, info) if info is not None else []
    return sum(math.prod(shape) for shape, _ in shapes) + 3 * outputs, "training.batch_size"


def _cnn_activations(model: dict[str, Any], info: dict[str, Any] | None, outputs: int) -> int:
    if info is None or info.get("image_shape") is None:
        return 3 * outputs
    channels, height, width = info["image_shape"]
    total = channels * height * width
    for out_channels in model["channels"]:
        total += 2 * out_channels * height * width  # conv output and activation
        if model["pool"]:
            height, width = height // 2, width // 2
            total += out_channels * height * width
    return int(total + 2 * sum(model["hidden"]) + 3 * outputs)


def _outputs(info: dict[str, Any] | None) -> int:
    info = info or {}
    return int(info.get("num_classes") or info.get("target_dim") or info.get("vocab_size") or 1)


def _dataset_bytes(dataset: dict[str, Any], info: dict[str, Any] | None) -> tuple[int, str]:
    if "url" in dataset:
        # the downloaded bytes, and the arrays parsed from them
        return 2 * URL_DATASET_MB * MIB, "dataset.url"
    name = dataset["name"]
    if name in ("blobs", "spirals"):
        features = dataset.get("n_features", 2)
        # generated in float64, cast to float32, then split into train and validation copies
        return dataset["n_samples"] * (features * (8 + 4 + 4) + 16), "dataset.n_samples"
    return 16 * MIB, "dataset.name"  # the bundled datasets are small (digits 0.5 MB, texts a few MB)
