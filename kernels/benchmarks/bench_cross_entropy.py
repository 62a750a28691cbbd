"""cross_entropy forward+backward: ours (fresh gradient buffer, and in place in the logits) vs
torch eager vs torch.compile, at LM vocabulary sizes."""

import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

import kernels
from kernels.benchmarks.harness import Case, Settings, Variant, compiled, tensor_bytes

# (rows, vocab): 8k tokens at a 128k vocabulary (2 GiB of bf16 logits) and 16k tokens at 32k.
SIZES = [(8192, 131072), (16384, 32768)]
SMOKE_SIZES = [(24, 200)]


def _step(loss_fn: Callable[..., torch.Tensor], logits: torch.Tensor, target: torch.Tensor,
          through_view: bool = False) -> Callable[[], None]:
    def run() -> None:
        logits.grad = None
        # In place needs a non-leaf, as an LM head's output is; a view of the leaf costs nothing.
        source = logits.view(logits.shape) if through_view else logits
        loss_fn(source, target).backward()

    return run


def _case(rows: int, vocab: int, dtype: torch.dtype, settings: Settings) -> Case:
    logits = torch.randn(rows, vocab, device=settings.device, dtype=dtype, requires_grad=True)
    target = torch.randint(0, vocab, (rows,), device=settings.device)
    target[::50] = -100
    size = tensor_bytes(logits, target)
    inplace = functools.partial(kernels.cross_entropy, inplace_grad=True)
    return Case(
        "cross_entropy", f"{rows}x{vocab} {str(dtype).removeprefix('torch.')}",
        [Variant("triton", _step(kernels.cross_entropy, logits, target), size),
         Variant("triton-inplace", _step(inplace, logits, target, through_view=True), size),
         Variant("eager", _step(F.cross_entropy, logits, target), size),
         Variant("compile", _step(compiled(F.cross_entropy, settings), logits, target), size)],
        # the minimum: read the logits once, write their gradient once
        bytes_moved=2 * logits.numel() * logits.element_size(),
        notes="triton-inplace overwrites the logits with their gradient (inplace_grad=True)",
    )


def cases(settings: Settings) -> Iterator[Case]:
    dtype = torch.float32 if settings.smoke else torch.bfloat16
    for rows, vocab in SMOKE_SIZES if settings.smoke else SIZES:
        yield _case(rows, vocab, dtype, settings)
