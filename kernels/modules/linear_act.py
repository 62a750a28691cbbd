"""``LinearAct``: ``nn.Linear`` followed by an activation, computed by :func:`kernels.linear_act`."""

import math

import torch
from torch import nn

from kernels.ops.activation import activation_code
from kernels.ops.linear_act import linear_act


class LinearAct(nn.Module):
    """Drop-in for ``nn.Sequential(nn.Linear(in, out, bias), activation)``.

    Parameters are named and initialised exactly as ``nn.Linear``'s (``weight`` (out, in),
    ``bias`` (out)), so a state dict moves between this and ``nn.Linear`` unchanged.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "gelu",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        activation_code(activation)  # fail at construction, not at the first forward
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.empty((out_features, in_features), device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation (Kaiming-uniform weight, fan-in-bounded bias)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_features
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_act(x, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation={self.activation!r}")
