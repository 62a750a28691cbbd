"""Datasets in memory: built-in (digits, tiny-text), synthetic (blobs, spirals) and user npz/csv.

Each is split into train and validation by the job's seed and served in batches whose order is a
pure function of (seed, epoch), so a resumed run can skip to any batch without replaying RNG.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from node_runtime.training.context import JobError
from node_runtime.training.user_data import (
    DEFAULT_LIMITS,
    DatasetLimits,
    parse_arrays,
    prepare_arrays,
    read_dataset_bytes,
)
from shared.jobspec import data_info
from shared.model_shapes import TEXT_VOCAB_SIZE

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
MAX_VAL_BATCH = 1024  # validation needs no gradients, so larger batches are cheaper per sample


@dataclass
class ArrayDataset:
    """Samples x (N, ...) float32 and targets y: class ids (N,) int64 or regression values (N, k) float32."""

    info: dict[str, Any]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor

    def batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self.train_x) / batch_size)

    def train_batches(self, seed: int, epoch: int, batch_size: int,
                      first_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's shuffled batches, starting at ``first_batch`` (to resume mid-epoch)."""
        order = torch.randperm(len(self.train_x), generator=_epoch_generator(seed, epoch))
        for start in range(first_batch * batch_size, len(order), batch_size):
            index = order[start:start + batch_size]
            yield self.train_x[index], self.train_y[index]

    def val_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        size = max(batch_size, MAX_VAL_BATCH)
        for start in range(0, len(self.val_x), size):
            yield self.val_x[start:start + size], self.val_y[start:start + size]


@dataclass
class TextDataset:
    """Byte tokens split in two contiguous parts; samples are windows of ``context`` + 1 bytes."""

    info: dict[str, Any]
    train_tokens: torch.Tensor
    val_tokens: torch.Tensor
    context: int

    def _windows_per_epoch(self) -> int:
        # room for a random offset in [0, context) so each epoch sees different window boundaries
        return max(0, (len(self.train_tokens) - self.context - 1) // self.context)

    def batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self._windows_per_epoch() / batch_size)

    def train_batches(self, seed: int, epoch: int, batch_size: int,
                      first_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = _epoch_generator(seed, epoch)
        offset = int(torch.randint(self.context, (1,), generator=generator))
        starts = offset + self.context * torch.randperm(self._windows_per_epoch(), generator=generator)
        for first in range(first_batch * batch_size, len(starts), batch_size):
            yield self._windows(self.train_tokens, starts[first:first + batch_size])

    def val_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        starts = torch.arange(0, max(0, len(self.val_tokens) - self.context - 1), self.context)
        size = max(batch_size, MAX_VAL_BATCH // 4)
        for first in range(0, len(starts), size):
            yield self._windows(self.val_tokens, starts[first:first + size])

    def _windows(self, tokens: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        windows = tokens[starts[:, None] + torch.arange(self.context + 1)].long()
        return windows[:, :-1], windows[:, 1:]  # inputs and their next-byte targets


Dataset = ArrayDataset | TextDataset


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


def load_dataset(spec: dict[str, Any], data_root: Path | None = None, allow_http: bool = False,
                 limits: DatasetLimits = DEFAULT_LIMITS) -> Dataset:
    """Load and split the dataset of a normalized spec; raises ``JobError`` when it cannot be used."""
    dataset, seed = spec["dataset"], spec["training"]["seed"]
    fraction = dataset["val_fraction"]
    if dataset["name"] == "tiny-text" and "url" not in dataset:
        return _split_text((DATA_DIR / "tiny_text.txt").read_bytes(), fraction, spec["model"].get("context", 64))
    if "url" in dataset:
        raw = read_dataset_bytes(dataset["url"], data_root, allow_http, limits)
        x, y, info = prepare_arrays(*parse_arrays(raw, dataset["format"], limits.max_bytes), task=dataset["task"])
        info = data_info(**info)
    elif dataset["name"] == "digits":
        with gzip.open(DATA_DIR / "digits.csv.gz", "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
        x, y = table[:, :-1] / 16.0, table[:, -1].astype(np.int64)  # pixels 0..16 -> 0..1
        info = data_info("classification", num_features=64, image_shape=[1, 8, 8], num_classes=10)
    else:
        x, y = _synthetic(dataset, seed)
        info = data_info("classification", num_features=x.shape[1], num_classes=dataset["n_classes"])
    order = np.random.default_rng(seed).permutation(len(x))
    val_count = min(len(x) - 1, max(1, round(len(x) * fraction))) if fraction > 0 else 0
    val, train = order[:val_count], order[val_count:]
    return ArrayDataset(info, torch.from_numpy(x[train]), torch.from_numpy(y[train]),
                        torch.from_numpy(x[val]), torch.from_numpy(y[val]))


def _split_text(data: bytes, fraction: float, context: int) -> TextDataset:
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    split = len(tokens) - int(len(tokens) * fraction)  # the tail is held out: windows must not straddle the split
    info = data_info("lm", vocab_size=TEXT_VOCAB_SIZE)
    dataset = TextDataset(info, tokens[:split].clone(), tokens[split:].clone(), context)
    if dataset.batches_per_epoch(1) == 0:
        raise JobError(f"the text is too short for context {context}: train on a shorter context")
    return dataset


def _synthetic(dataset: dict[str, Any], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """blobs: Gaussian clusters around random centres; spirals: interleaved arms in the plane."""
    rng = np.random.default_rng(seed)
    count, classes = dataset["n_samples"], dataset["n_classes"]
    y = np.arange(count) % classes
    if dataset["name"] == "blobs":
        centres = rng.uniform(-5.0, 5.0, size=(classes, dataset["n_features"]))
        x = centres[y] + rng.normal(0.0, dataset["noise"], size=(count, dataset["n_features"]))
    else:
        along = rng.uniform(0.0, 1.0, size=count)  # position along the arm: radius grows, angle turns
        angle = 4.0 * along + 2.0 * math.pi * y / classes + rng.normal(0.0, dataset["noise"], size=count)
        x = np.stack([along * np.cos(angle), along * np.sin(angle)], axis=1) * 2.0
    return x.astype(np.float32), y.astype(np.int64)
