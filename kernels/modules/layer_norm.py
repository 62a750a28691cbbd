"""``LayerNorm``: ``nn.LayerNorm`` computed by :func:`kernels.layer_norm`."""

import torch
from torch import nn

from kernels.ops.layer_norm import layer_norm


class LayerNorm(nn.Module):
    """Drop-in for ``nn.LayerNorm``: same ``weight``/``bias`` names, shapes and initial values."""

    def __init__(self, normalized_shape: int | tuple[int, ...], eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape = shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        """Ones and zeros, as ``nn.LayerNorm``."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None and self.bias is None and len(self.normalized_shape) > 1:
            # Without parameters the op cannot see the normalized shape: flatten it into one dim.
            flat = x.reshape(*x.shape[: x.dim() - len(self.normalized_shape)], -1)
            return layer_norm(flat, None, None, self.eps).view(x.shape)
        return layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
