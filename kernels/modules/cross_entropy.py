"""``CrossEntropyLoss``: ``nn.CrossEntropyLoss`` (class-index targets) by :func:`kernels.cross_entropy`."""

import torch
from torch import nn

from kernels.ops.cross_entropy import cross_entropy


class CrossEntropyLoss(nn.Module):
    """Drop-in for ``nn.CrossEntropyLoss(ignore_index=..., reduction=...)`` with index targets.

    Logits are ``(N, V)`` or ``(..., V)`` (class dimension last). ``inplace_grad=True`` reuses the
    logits' memory for their gradient (see :func:`kernels.cross_entropy`); leave it off unless
    nothing reads the logits after the loss is computed.
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", *, inplace_grad: bool = False) -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.inplace_grad = inplace_grad

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, target, self.ignore_index, self.reduction, inplace_grad=self.inplace_grad)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, inplace_grad={self.inplace_grad}"
