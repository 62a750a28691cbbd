"""The distance an audit falls back on when a replay is not bitwise equal (node_runtime/replay.py):
the reproduction error relative to the segment's own update, as proof-of-learning measures it."""

from __future__ import annotations

import safetensors.torch
import torch

from node_runtime.replay import FAR, weight_distance


def state(values: dict[str, torch.Tensor], prefix: str = "") -> bytes:
    return safetensors.torch.save({prefix + k: v.contiguous() for k, v in values.items()})


def test_distance_is_relative_to_the_segments_update() -> None:
    gen = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(64, 32, generator=gen), "b": torch.zeros(32)}
    trained = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in start.items()}
    assert weight_distance(state(trained), state(trained), start) == 0.0
    # float noise of another thread count (1e-7 per weight) is far below the 0.01 tolerance
    noisy = {k: v + 1e-7 * torch.randn(v.shape, generator=gen) for k, v in trained.items()}
    assert 0 < weight_distance(state(noisy), state(trained), start) < 1e-4
    # a checkpoint's model part compares with a model file's tensors
    assert weight_distance(state(trained, "model/"), state(trained), start) == 0.0
    # a forged state (every weight 0.4242) is about one update away, or more
    forged = {k: torch.full_like(v, 0.4242) for k, v in trained.items()}
    assert weight_distance(state(trained), state(forged), start) > 0.5


def test_what_cannot_be_compared_is_far() -> None:
    start = {"w": torch.zeros(4)}
    assert weight_distance(state({"w": torch.ones(4)}), state({"v": torch.ones(4)}), start) == FAR
    assert weight_distance(state({"w": torch.ones(4)}), state({"w": torch.ones(5)}), start) == FAR
    # zero steps: the trainer's weights did not move, so any difference is a lie
    assert weight_distance(state({"w": torch.ones(4)}), state(start), start) == FAR
    assert weight_distance(state(start), state(start), start) == 0.0
