"""Sampling text from trained language models: lengths, seeds, sources, refusals and the CLI."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from node_runtime.training import load_trained_model, run_training
from node_runtime.training.generate import generate, generate_bytes, main

REPO = Path(__file__).resolve().parents[3]
TINY_TRANSFORMER = {"type": "transformer", "d_model": 32, "n_layers": 1, "n_heads": 2, "context": 32}


def _train(spec: dict[str, Any], recorder: Callable[..., Any], steps: int) -> bytes:
    result = run_training(spec, recorder().context(cpu_threads=1, stop_at_step=steps))
    return result.weights


@pytest.fixture(scope="module")
def text_weights(spec_for: Callable[..., dict[str, Any]], recorder: Callable[..., Any]) -> bytes:
    """A tiny transformer after 40 steps on tiny-text: it already prefers letters, spaces and newlines."""
    return _train(spec_for(TINY_TRANSFORMER, "tiny-text", batch_size=16, learning_rate=0.01), recorder, 40)


@pytest.fixture(scope="module")
def digits_weights(spec_for: Callable[..., dict[str, Any]], recorder: Callable[..., Any]) -> bytes:
    return _train(spec_for({"type": "mlp", "hidden": [16]}), recorder, 2)


def test_the_prompt_is_continued_by_exactly_the_asked_bytes(text_weights: bytes) -> None:
    continuation = generate_bytes(text_weights, b"ROMEO:", tokens=200)
    text = generate(text_weights, "ROMEO:", tokens=200)
    assert len(continuation) == 200
    assert text == "ROMEO:" + continuation.decode("utf-8", errors="replace")


def test_same_seed_same_text_other_seed_other_text(text_weights: bytes) -> None:
    first = generate(text_weights, "LYSANDER:", tokens=100, seed=1)
    assert generate(text_weights, "LYSANDER:", tokens=100, seed=1) == first
    assert generate(text_weights, "LYSANDER:", tokens=100, seed=2) != first


def test_temperature_zero_is_greedy_whatever_the_seed(text_weights: bytes) -> None:
    greedy = generate(text_weights, "The ", tokens=50, temperature=0, seed=1)
    assert generate(text_weights, "The ", tokens=50, temperature=0, seed=2) == greedy


def test_bytes_path_and_loaded_module_give_the_same_text(text_weights: bytes, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(text_weights)
    from_bytes = generate(text_weights, "MACBETH:", tokens=80, seed=5)
    assert generate(path, "MACBETH:", tokens=80, seed=5) == from_bytes
    assert generate(str(path), "MACBETH:", tokens=80, seed=5) == from_bytes
    module = load_trained_model(text_weights)
    assert generate(module, "MACBETH:", tokens=80, seed=5) == from_bytes  # its context is read from the module
    with pytest.raises(ValueError, match="longer than the model's window of 32 bytes"):
        generate(module, "MACBETH:", tokens=10, context=33)


def test_empty_and_overlong_prompts(text_weights: bytes) -> None:
    assert len(generate_bytes(text_weights, b"", tokens=30)) == 30  # starts from a newline, not returned
    long_prompt = "Is this a dagger which I see before me, the handle toward my hand? " * 3  # > context 32
    assert len(generate_bytes(text_weights, long_prompt.encode(), tokens=30)) == 30
    assert generate(text_weights, long_prompt, tokens=30).startswith(long_prompt)


def test_a_sequential_text_model_is_fed_its_whole_window(spec_for: Callable[..., dict[str, Any]],
                                                         recorder: Callable[..., Any]) -> None:
    model = {"type": "sequential", "context": 16,
             "layers": [{"type": "embedding", "dim": 16}, {"type": "linear", "out": 256}]}
    weights = _train(spec_for(model, "tiny-text", batch_size=16), recorder, 5)
    assert len(generate_bytes(weights, b"Hi", tokens=20)) == 20  # a 2-byte prompt is padded to 16 ids


def test_any_module_with_a_context(text_weights: bytes) -> None:
    torch.manual_seed(0)
    bigram = nn.Sequential(nn.Embedding(256, 8), nn.Linear(8, 256))
    assert len(generate_bytes(bigram, b"abc", tokens=10, context=4)) == 10
    assert bigram.training  # its mode is given back
    with pytest.raises(ValueError, match="pass context="):
        generate(bigram, "abc", tokens=10)
    with pytest.raises(ValueError, match="not a byte language model"):
        generate(nn.Embedding(256, 8), "abc", tokens=10, context=4)


def test_the_digits_mlp_is_refused_as_not_a_language_model(digits_weights: bytes) -> None:
    with pytest.raises(ValueError, match="not a language model: this mlp was trained for classification on digits"):
        generate(digits_weights, "ROMEO:")
    with pytest.raises(ValueError, match="not a language model: this MLP"):
        generate(load_trained_model(digits_weights), "ROMEO:")
    with pytest.raises(ValueError, match="not a CyxWiz model file"):
        generate(b"\x02\x00\x00\x00\x00\x00\x00\x00{}", "ROMEO:")


@pytest.mark.parametrize(("options", "message"), [
    ({"tokens": 0}, "tokens must be"), ({"tokens": 100_001}, "tokens must be"), ({"tokens": True}, "tokens must be"),
    ({"temperature": -0.5}, "temperature must be"), ({"temperature": float("nan")}, "temperature must be"),
    ({"top_k": 0}, "top_k must be"), ({"seed": -1}, "seed must be"), ({"context": 0}, "context must be"),
])
def test_bad_arguments_are_refused(text_weights: bytes, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate(text_weights, "ROMEO:", **options)


def test_the_cli_prints_the_text(text_weights: bytes, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(text_weights)
    # greedy: the same bytes whatever thread count the child's torch picks
    command = [sys.executable, "-m", "node_runtime.training.generate", str(path), "--prompt", "ROMEO:",
               "--tokens", "60", "--temperature", "0"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == generate(text_weights, "ROMEO:", tokens=60, temperature=0) + "\n"


def test_the_cli_names_what_is_wrong(digits_weights: bytes, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "digits.safetensors"
    path.write_bytes(digits_weights)
    assert main([str(path), "--prompt", "ROMEO:"]) == 1
    assert "not a language model" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.safetensors")]) == 1
    assert "No such file" in capsys.readouterr().err
