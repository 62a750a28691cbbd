"""Activations fused into the matmul epilogue: their Triton forms, derivatives and torch twins.

Kernels select an activation with an integer constexpr (names do not travel well through
``tl.constexpr``), so each name maps to a code here and nowhere else.
"""

import torch
import torch.nn.functional as F
import triton.language as tl

from kernels.runtime import jit

ACTIVATIONS: dict[str, int] = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}

_RELU = tl.constexpr(1)
_GELU = tl.constexpr(2)
_SILU = tl.constexpr(3)
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


def activation_code(name: str) -> int:
    """The kernel code for an activation name; a ValueError names the choices."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}") from None


def torch_activation(z: torch.Tensor, name: str) -> torch.Tensor:
    """The same activation in torch (exact-erf GELU, as ``nn.GELU()``), for the CPU fallback."""
    if name == "relu":
        return F.relu(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "silu":
        return F.silu(z)
    activation_code(name)
    return z


@jit
def _sigmoid(z):
    # exp(-|z|) never overflows, unlike 1 / (1 + exp(-z)) for very negative z.
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@jit
def apply_activation(z, ACTIVATION: tl.constexpr):
    """act(z) for an fp32 block."""
    out = z
    if ACTIVATION == _RELU:
        out = tl.maximum(z, 0.0)
    elif ACTIVATION == _GELU:
        out = 0.5 * z * (1.0 + tl.math.erf(z * _INV_SQRT2))
    elif ACTIVATION == _SILU:
        out = z * _sigmoid(z)
    return out


@jit
def activation_and_derivative(z, ACTIVATION: tl.constexpr):
    """(act(z), act'(z)) for an fp32 block; the derivative is what backward multiplies grads by."""
    out = z
    slope = tl.full(z.shape, 1.0, tl.float32)
    if ACTIVATION == _RELU:
        positive = z > 0.0
        out = tl.where(positive, z, 0.0)
        slope = tl.where(positive, 1.0, 0.0)
    elif ACTIVATION == _GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * _INV_SQRT2))
        out = z * cdf
        slope = cdf + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    elif ACTIVATION == _SILU:
        s = _sigmoid(z)
        out = z * s
        slope = s * (1.0 + z * (1.0 - s))
    return out, slope
