"""``RMSNorm``: ``nn.RMSNorm`` over the last dimension computed by :func:`kernels.rms_norm`."""

import torch
from torch import nn

from kernels.ops.rms_norm import rms_norm


class RMSNorm(nn.Module):
    """Drop-in for ``nn.RMSNorm(dim, eps)``: one ``weight`` of ones, the same state dict."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        """Ones, as ``nn.RMSNorm``."""
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
