"""linear_act forward+backward (matmul + bias + GELU): ours vs eager cuBLAS + GELU vs torch.compile."""

from collections.abc import Iterator

import torch
import torch.nn.functional as F

import kernels
from kernels.benchmarks.harness import Case, Settings, fwd_bwd_case

# (rows, in_features, out_features): a transformer MLP up-projection at two widths.
SIZES = [(16384, 1024, 4096), (8192, 4096, 16384)]
SMOKE_SIZES = [(40, 24, 48)]


def _eager(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.gelu(F.linear(x, w, b))


def cases(settings: Settings) -> Iterator[Case]:
    dtype = torch.float32 if settings.smoke else torch.bfloat16
    for rows, n_in, n_out in SMOKE_SIZES if settings.smoke else SIZES:
        x = torch.randn(rows, n_in, device=settings.device, dtype=dtype, requires_grad=True)
        weight = (torch.randn(n_out, n_in, device=settings.device, dtype=dtype) / n_in**0.5).requires_grad_()
        bias = torch.zeros(n_out, device=settings.device, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(rows, n_out, device=settings.device, dtype=dtype)
        yield fwd_bwd_case("linear_act", f"{rows}x{n_in}->{n_out} gelu", [x, weight, bias], grad_out,
                           kernels.linear_act, _eager, settings,
                           flops=6.0 * rows * n_in * n_out)  # forward, grad input, grad weight
