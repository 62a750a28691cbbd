"""rms_norm forward+backward: ours vs torch eager vs torch.compile."""

from collections.abc import Iterator

import torch
import torch.nn.functional as F

import kernels
from kernels.benchmarks.harness import Case, Settings, Variant, compiled, fwd_bwd, tensor_bytes

SIZES = [(65536, 2048), (16384, 8192)]
SMOKE_SIZES = [(48, 96)]


def cases(settings: Settings) -> Iterator[Case]:
    dtype = torch.float32 if settings.smoke else torch.bfloat16
    for rows, hidden in SMOKE_SIZES if settings.smoke else SIZES:
        x = torch.randn(rows, hidden, device=settings.device, dtype=dtype, requires_grad=True)
        weight = torch.randn(hidden, device=settings.device, dtype=dtype, requires_grad=True)
        grad_out = torch.randn_like(x)
        inputs = [x, weight]
        size = tensor_bytes(x, grad_out)

        def eager(x: torch.Tensor, w: torch.Tensor, n: int = hidden) -> torch.Tensor:
            return F.rms_norm(x, (n,), w, 1e-6)

        yield Case(
            "rms_norm", f"{rows}x{hidden} {str(dtype).removeprefix('torch.')}",
            [Variant("triton", fwd_bwd(kernels.rms_norm, inputs, grad_out=grad_out), size),
             Variant("eager", fwd_bwd(eager, inputs, grad_out=grad_out), size),
             Variant("compile", fwd_bwd(compiled(eager, settings), inputs, grad_out=grad_out), size)],
            bytes_moved=5 * x.numel() * x.element_size(),
        )
