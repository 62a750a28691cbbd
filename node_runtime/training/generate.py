"""Text from a trained byte-level language model: a prompt in, the prompt plus a sampled continuation out.

The text datasets are modelled as raw bytes (vocabulary 256), so the prompt is fed as its UTF-8 bytes
and the continuation is decoded with ``errors="replace"``: a model may stop in the middle of a character.

    python -m node_runtime.training.generate model.safetensors --prompt "ROMEO:" --tokens 200
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

from node_runtime.training.checkpoints import WEIGHTS_FORMAT, load_trained_model, read_metadata
from node_runtime.training.models import CNN, MLP, SequentialModel
from shared.model_shapes import TEXT_VOCAB_SIZE

MAX_TOKENS = 100_000
LINE_START = 10  # b"\n": an empty prompt starts where every speech of the training text starts

ModelSource = nn.Module | bytes | str | Path


def generate(model: ModelSource, prompt: str, tokens: int = 200, temperature: float = 0.8,
             top_k: int | None = 40, seed: int = 0, *, context: int | None = None) -> str:
    """``prompt`` followed by ``tokens`` bytes sampled one at a time from a language model.

    ``model`` is a ``model.safetensors`` path or its bytes (rebuilt with ``load_trained_model``; its
    context window is the spec's ``model.context``), or a module: a CyxWiz transformer or sequential
    text model, or any module mapping token ids (batch, length) to logits (batch, length, 256) whose
    window is given as ``context`` (or its ``context`` attribute). At most ``context`` bytes are fed.
    Each byte is drawn from the softmax of the last position's logits divided by ``temperature``,
    restricted to the ``top_k`` likeliest bytes (None: all), with a generator seeded by ``seed``, so
    the same arguments give the same text. ``temperature`` 0 means greedy: always the likeliest byte.
    Runs under ``torch.no_grad()`` where the module's weights are (the CPU for a file).
    Raises ``ValueError`` for a model that is not a language model and for out-of-range arguments.
    """
    try:
        prompt_bytes = prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"the prompt cannot be encoded as UTF-8: {error.reason}") from error
    continuation = generate_bytes(model, prompt_bytes, tokens, temperature, top_k, seed, context=context)
    return prompt + continuation.decode("utf-8", errors="replace")


def generate_bytes(model: ModelSource, prompt: bytes, tokens: int = 200, temperature: float = 0.8,
                   top_k: int | None = 40, seed: int = 0, *, context: int | None = None) -> bytes:
    """The ``tokens`` new bytes alone (not the prompt), exactly as sampled; see ``generate``."""
    _check_sampling(tokens, temperature, top_k, seed)
    if not isinstance(model, nn.Module):
        model, file_context = load_language_model(model)
        context = file_context if context is None else context
    network, window = model, _module_context(model, context)
    fixed_length = isinstance(network, SequentialModel)  # it reshapes every input to exactly `context` ids
    device = next(network.parameters(), torch.empty(0)).device
    generator = torch.Generator().manual_seed(seed)
    history = list(prompt) or [LINE_START]
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            for _ in range(tokens):
                fed = history[-window:]
                if fixed_length:  # its positions are independent, so padding cannot change the last one
                    fed = [LINE_START] * (window - len(fed)) + fed
                logits = network(torch.tensor([fed], device=device))
                if logits.dim() != 3 or logits.shape[0] != 1 or logits.shape[-1] != TEXT_VOCAB_SIZE:
                    raise ValueError(f"not a byte language model: it gives outputs of shape {tuple(logits.shape)}, "
                                     f"not (1, length, {TEXT_VOCAB_SIZE}) next-byte logits")
                history.append(_next_byte(logits[0, -1].float().cpu(), temperature, top_k, generator))
    finally:
        network.train(was_training)
    return bytes(history[len(history) - tokens:])


def load_language_model(source: bytes | str | Path) -> tuple[nn.Module, int]:
    """The model of a ``model.safetensors`` file (path or bytes) and its context window.

    Raises ``ValueError`` when the file is not a CyxWiz model or its model is not a language model.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    metadata = read_metadata(data)
    if metadata.get("cyxwiz_format") != WEIGHTS_FORMAT:
        raise ValueError("not a CyxWiz model file: its metadata lacks the spec to rebuild the model")
    spec, info = json.loads(metadata["spec"]), json.loads(metadata["data_info"])
    if info.get("task") != "lm":
        trained_on = spec["dataset"].get("name", "user data")
        raise ValueError(f"not a language model: this {spec['model']['type']} was trained for {info.get('task')} "
                         f"on {trained_on}; train one on a text dataset such as tiny-text")
    return load_trained_model(data), int(spec["model"]["context"])


def _module_context(model: nn.Module, context: int | None) -> int:
    if isinstance(model, MLP | CNN) or (isinstance(model, SequentialModel) and not model.takes_tokens):
        raise ValueError(f"not a language model: this {type(model).__name__} over features or images cannot "
                         "continue text; train a transformer on a text dataset such as tiny-text")
    if isinstance(model, SequentialModel):  # its window is fixed by its spec
        return model.input_shape[0]
    own = getattr(model, "context", None)  # a CyxWiz transformer's window (its position embeddings)
    if context is None:
        if not isinstance(own, int):
            raise ValueError(f"cannot tell the context window of this {type(model).__name__}: pass context=")
        context = own
    if isinstance(own, int) and isinstance(context, int) and context > own:
        raise ValueError(f"context {context} is longer than the model's window of {own} bytes")
    return _positive_context(context)


def _positive_context(context: int) -> int:
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive whole number of bytes, not {context!r}")
    return context


def _check_sampling(tokens: int, temperature: float, top_k: int | None, seed: int) -> None:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= MAX_TOKENS:
        raise ValueError(f"tokens must be a whole number from 1 to {MAX_TOKENS:,}, not {tokens!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be 0 (greedy) or positive, not {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive whole number or None (all bytes), not {top_k!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be a whole number from 0 to 2**63 - 1, not {seed!r}")


def _next_byte(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth_largest = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, -math.inf)
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def _terminal_safe(text: str) -> str:
    # a model file may come from anyone: its bytes must not drive the terminal (ESC sequences and the like)
    return "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" if ord(c) < 0x100
                   else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}" for c in text)


def main(argv: list[str] | None = None) -> int:
    """``python -m node_runtime.training.generate MODEL --prompt TEXT --tokens N``: print a sample."""
    parser = argparse.ArgumentParser(prog="python -m node_runtime.training.generate",
                                     description="Continue a prompt with a trained CyxWiz language model.")
    parser.add_argument("model", help="a model.safetensors of a transformer (or sequential model) trained on text")
    parser.add_argument("--prompt", default="", help="the text to continue (default: empty, start a new line)")
    parser.add_argument("--tokens", type=int, default=200, help=f"bytes to sample, 1-{MAX_TOKENS:,} (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy; higher is wilder (default 0.8)")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest bytes; 0: all (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same text (default 0)")
    args = parser.parse_args(argv)
    try:
        text = generate(Path(args.model), args.prompt, args.tokens, args.temperature, args.top_k or None, args.seed)
    except (ValueError, OSError) as error:
        print(f"generate: {error}", file=sys.stderr)
        return 1
    print(_terminal_safe(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
