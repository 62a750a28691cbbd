"""Datasets in memory: built-in (digits, tiny-text, tiny-shakespeare), synthetic (blobs, spirals) and user npz/csv.

Which samples are held out (validation, and an optional test split) is fixed by ``dataset.split_seed``
alone, as are the synthetic samples themselves, so a sweep over ``training.seed`` trains and validates
on the same data. The training batches come in an order that is a pure function of (training.seed,
epoch), so a resumed run can skip to any batch without replaying RNG.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
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
from shared.jobspec import TEXT_DATASETS, data_info
from shared.model_shapes import TEXT_VOCAB_SIZE
from shared.splits import held_out_bytes, held_out_samples, windows_per_epoch

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# the shipped corpora of the text datasets (node_runtime/data/README.md says where they come from)
TEXT_FILES = {"tiny-text": "tiny_text.txt", "tiny-shakespeare": "tiny_shakespeare.txt.gz"}
MAX_VAL_BATCH = 1024  # validation needs no gradients, so larger batches are cheaper per sample

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ArrayDataset:
    """Samples x (N, ...) float32 and targets y: class ids (N,) int64 or regression values (N, k) float32.

    ``test_x``/``test_y`` hold the test split; empty when the spec asks for none (test_fraction 0).
    """

    info: dict[str, Any]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    test_y: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))

    def batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self.train_x) / batch_size)

    def train_batches(self, seed: int, epoch: int, batch_size: int, first_batch: int = 0) -> Iterator[Batch]:
        """This epoch's shuffled batches, starting at ``first_batch`` (to resume mid-epoch)."""
        order = torch.randperm(len(self.train_x), generator=_epoch_generator(seed, epoch))
        for start in range(first_batch * batch_size, len(order), batch_size):
            index = order[start:start + batch_size]
            yield self.train_x[index], self.train_y[index]

    def val_batches(self, batch_size: int) -> Iterator[Batch]:
        """The validation split in order, in batches of at least ``batch_size``."""
        return self._held_out_batches(self.val_x, self.val_y, batch_size)

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        """The test split, as :meth:`val_batches` serves validation; nothing when there is no test split."""
        return self._held_out_batches(self.test_x, self.test_y, batch_size)

    @staticmethod
    def _held_out_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[Batch]:
        size = max(batch_size, MAX_VAL_BATCH)
        for start in range(0, len(x), size):
            yield x[start:start + size], y[start:start + size]


@dataclass
class TextDataset:
    """Byte tokens split in contiguous parts, train | val | test; samples are windows of ``context`` + 1 bytes.

    ``test_tokens`` is the test split at the very end of the text; empty when the spec asks for none.
    """

    info: dict[str, Any]
    train_tokens: torch.Tensor
    val_tokens: torch.Tensor
    context: int
    test_tokens: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))

    def _windows_per_epoch(self) -> int:
        return windows_per_epoch(len(self.train_tokens), self.context)

    def batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self._windows_per_epoch() / batch_size)

    def train_batches(self, seed: int, epoch: int, batch_size: int, first_batch: int = 0) -> Iterator[Batch]:
        generator = _epoch_generator(seed, epoch)
        offset = int(torch.randint(self.context, (1,), generator=generator))
        starts = offset + self.context * torch.randperm(self._windows_per_epoch(), generator=generator)
        for first in range(first_batch * batch_size, len(starts), batch_size):
            yield self._windows(self.train_tokens, starts[first:first + batch_size])

    def val_batches(self, batch_size: int) -> Iterator[Batch]:
        """Consecutive windows of the validation split, in batches of at least ``batch_size``."""
        return self._held_out_batches(self.val_tokens, batch_size)

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        """The test split, as :meth:`val_batches` serves validation; nothing when there is no test split."""
        return self._held_out_batches(self.test_tokens, batch_size)

    def _held_out_starts(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.arange(0, max(0, len(tokens) - self.context - 1), self.context)

    def _held_out_batches(self, tokens: torch.Tensor, batch_size: int) -> Iterator[Batch]:
        starts = self._held_out_starts(tokens)
        size = max(batch_size, MAX_VAL_BATCH // 4)
        for first in range(0, len(starts), size):
            yield self._windows(tokens, starts[first:first + size])

    def _windows(self, tokens: torch.Tensor, starts: torch.Tensor) -> Batch:
        windows = tokens[starts[:, None] + torch.arange(self.context + 1)].long()
        return windows[:, :-1], windows[:, 1:]  # inputs and their next-byte targets


Dataset = ArrayDataset | TextDataset


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


def load_dataset(spec: dict[str, Any], data_root: Path | None = None, allow_http: bool = False,
                 limits: DatasetLimits = DEFAULT_LIMITS) -> Dataset:
    """Load and split the dataset of a normalized spec; raises ``JobError`` when it cannot be used."""
    dataset = spec["dataset"]
    if dataset["name"] in TEXT_DATASETS and "url" not in dataset:
        return _split_text(read_text(dataset["name"]), dataset, spec["model"].get("context", 64))
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
        x, y = _synthetic(dataset, dataset["split_seed"])
        info = data_info("classification", num_features=x.shape[1], num_classes=dataset["n_classes"])
    return _split_arrays(x, y, info, dataset)


def read_text(name: str) -> bytes:
    """The shipped corpus of a text dataset (``TEXT_FILES``), as bytes."""
    path = DATA_DIR / TEXT_FILES[name]
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


def _split_arrays(x: np.ndarray, y: np.ndarray, info: dict[str, Any], dataset: dict[str, Any]) -> ArrayDataset:
    """Validation first, then test, from one permutation of dataset.split_seed; the rest trains."""
    count = len(x)
    val_count, test_count = held_out_samples(count, dataset["val_fraction"], dataset["test_fraction"])
    if val_count + test_count >= count:
        raise JobError(f"dataset.test_fraction: {count} samples leave none to train on after {val_count} for "
                       f"validation and {test_count} for test: lower dataset.val_fraction or dataset.test_fraction")
    order = np.random.default_rng(dataset["split_seed"]).permutation(count)
    val, test, train = np.split(order, [val_count, val_count + test_count])
    return ArrayDataset(info, torch.from_numpy(x[train]), torch.from_numpy(y[train]),
                        torch.from_numpy(x[val]), torch.from_numpy(y[val]),
                        torch.from_numpy(x[test]), torch.from_numpy(y[test]))


def _split_text(data: bytes, dataset: dict[str, Any], context: int) -> TextDataset:
    """Contiguous train | val | test: the held-out parts are the tail, so no window straddles a split."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    val_bytes, test_bytes = held_out_bytes(len(tokens), dataset["val_fraction"], dataset["test_fraction"])
    train_end, val_end = len(tokens) - val_bytes - test_bytes, len(tokens) - test_bytes
    info = data_info("lm", vocab_size=TEXT_VOCAB_SIZE)
    text = TextDataset(info, tokens[:train_end].clone(), tokens[train_end:val_end].clone(), context,
                       tokens[val_end:].clone())
    if text.batches_per_epoch(1) == 0:
        raise JobError(f"model.context: the training split ({train_end:,} bytes) is too short for context "
                       f"{context}: train on a shorter context or hold out less")
    if dataset["test_fraction"] > 0 and len(text._held_out_starts(text.test_tokens)) == 0:
        raise JobError(f"dataset.test_fraction: the test split ({test_bytes:,} bytes) holds no window of "
                       f"context {context} + 1 bytes: hold out more or train on a shorter context")
    return text


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
