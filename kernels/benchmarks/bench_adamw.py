"""AdamW step: ours (one launch per group) vs torch's foreach (default) and fused steps vs a
torch.compile'd step, on a parameter set shaped like a ~185M-parameter transformer."""

from collections.abc import Callable, Iterator

import torch

import kernels
from kernels.benchmarks.harness import Case, Settings, Variant, compiled, tensor_bytes

LAYERS, WIDTH = 12, 1024  # 185M parameters in 121 tensors: realistic, and quick to torch.compile
SMOKE_LAYERS, SMOKE_WIDTH = 2, 32


def _shapes(layers: int, width: int) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    for _ in range(layers):  # per block: qkv, out proj, mlp up/down, their biases, two norms
        shapes += [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width),
                   (3 * width,), (width,), (4 * width,), (width,), (width,), (width,)]
    return shapes + [(32 * width, width)]  # embedding


def _parameters(shapes: list[tuple[int, ...]], device: torch.device) -> list[torch.Tensor]:
    params = [(torch.randn(shape, device=device) * 0.02).requires_grad_() for shape in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3  # kept across steps: the step alone is measured
    return params


def _variant(name: str, make: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
             shapes: list[tuple[int, ...]], settings: Settings, compile_step: bool = False) -> Variant:
    params = _parameters(shapes, settings.device)  # each optimizer steps its own copy
    optimizer = make(params)
    step = compiled(optimizer.step, settings) if compile_step else optimizer.step
    # p, g and the two moments all exist before a step (after the warm-up's first one)
    return Variant(name, lambda: step(), 4 * tensor_bytes(*params))


def cases(settings: Settings) -> Iterator[Case]:
    shapes = _shapes(*((SMOKE_LAYERS, SMOKE_WIDTH) if settings.smoke else (LAYERS, WIDTH)))
    numel = sum(torch.Size(s).numel() for s in shapes)
    hyper = dict(lr=1e-4, weight_decay=0.1)
    variants = [
        _variant("triton", lambda ps: kernels.AdamW(ps, **hyper), shapes, settings),
        _variant("eager", lambda ps: torch.optim.AdamW(ps, **hyper), shapes, settings),
        _variant("compile", lambda ps: torch.optim.AdamW(ps, **hyper), shapes, settings, compile_step=True),
    ]
    if settings.device.type == "cuda":
        variants.append(_variant("eager-fused", lambda ps: torch.optim.AdamW(ps, fused=True, **hyper), shapes,
                                 settings))
    yield Case(
        "adamw", f"{numel:,} fp32 params in {len(shapes)} tensors", variants,
        bytes_moved=7 * numel * 4,  # read p, g, m, v; write p, m, v
        notes="eager = torch.optim.AdamW (foreach); compile = torch.compile(AdamW.step)",
    )
