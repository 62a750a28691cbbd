"""rms_norm forward+backward: ours vs torch eager vs torch.compile."""

from collections.abc import Iterator

import torch
import torch.nn.functional as F

import kernels
from kernels.benchmarks.bench_layer_norm import SIZES, SMOKE_SIZES
from kernels.benchmarks.harness import Case, Settings, fwd_bwd_case


def cases(settings: Settings) -> Iterator[Case]:
    dtype = torch.float32 if settings.smoke else torch.bfloat16
    for rows, hidden in SMOKE_SIZES if settings.smoke else SIZES:
        x = torch.randn(rows, hidden, device=settings.device, dtype=dtype, requires_grad=True)
        weight = torch.randn(hidden, device=settings.device, dtype=dtype, requires_grad=True)

        def eager(x: torch.Tensor, w: torch.Tensor, n: int = hidden) -> torch.Tensor:
            return F.rms_norm(x, (n,), w, 1e-6)

        yield fwd_bwd_case("rms_norm", f"{rows}x{hidden}", [x, weight], torch.randn_like(x), kernels.rms_norm,
                           eager, settings, bytes_moved=5 * x.numel() * x.element_size())
