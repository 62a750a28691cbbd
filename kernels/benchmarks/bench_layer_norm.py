"""layer_norm forward+backward: ours vs torch eager vs torch.compile."""

from collections.abc import Iterator

import torch
import torch.nn.functional as F

import kernels
from kernels.benchmarks.harness import Case, Settings, fwd_bwd_case

# (rows, hidden): many narrow rows, and few wide ones; both are 256 MiB of bf16 input, ~5x the L2.
SIZES = [(65536, 2048), (16384, 8192)]
SMOKE_SIZES = [(48, 96)]


def cases(settings: Settings) -> Iterator[Case]:
    dtype = torch.float32 if settings.smoke else torch.bfloat16
    for rows, hidden in SMOKE_SIZES if settings.smoke else SIZES:
        x = torch.randn(rows, hidden, device=settings.device, dtype=dtype, requires_grad=True)
        weight = torch.randn(hidden, device=settings.device, dtype=dtype, requires_grad=True)
        bias = torch.randn(hidden, device=settings.device, dtype=dtype, requires_grad=True)

        def eager(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, n: int = hidden) -> torch.Tensor:
            return F.layer_norm(x, (n,), w, b)

        yield fwd_bwd_case("layer_norm", f"{rows}x{hidden}", [x, weight, bias], torch.randn_like(x),
                           kernels.layer_norm, eager, settings,
                           # forward reads x, writes y; backward reads x and dy, writes dx
                           bytes_moved=5 * x.numel() * x.element_size())
