"""How a dataset is cut into training, validation and test parts: one rule for the node, which cuts the
data (node_runtime/training/datasets.py), and the gateway, which counts a job's steps without the data
(``shared.safetensors_check.batches_per_epoch``). Were they to differ, progress would disagree with the
node's ``total_steps`` and checkpoints would be refused."""

from __future__ import annotations


def held_out_samples(count: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Validation and test sample counts of an array dataset of ``count`` samples. Validation keeps at
    least one sample for training; this formula (and split seed 0's permutation) predates the test split."""
    val = min(count - 1, max(1, round(count * val_fraction))) if val_fraction > 0 else 0
    test = max(1, round(count * test_fraction)) if test_fraction > 0 else 0
    return val, test


def held_out_bytes(size: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Validation and test byte counts of a text of ``size`` bytes (its tail: train | val | test)."""
    return int(size * val_fraction), int(size * test_fraction)


def windows_per_epoch(train_bytes: int, context: int) -> int:
    """Training windows of ``context`` + 1 bytes in one epoch, leaving room for a random offset in
    [0, context) so each epoch sees different window boundaries."""
    return max(0, (train_bytes - context - 1) // context)
