"""Devices, dtypes and tolerances shared by the kernel tests.

References are computed by torch in float64 from the same (possibly low-precision) inputs, so the
tolerance only has to cover our kernels' own rounding: the output store, and for matmuls the
rounding of the scaled operand before the tensor-core product.
"""

import pytest
import torch

GPU = pytest.mark.gpu

# (device, dtype): fp32 and fp16 run in the CPU interpreter; bf16 exists only on the GPU (numpy,
# which the interpreter computes with, has no bfloat16).
DEVICE_DTYPES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", torch.float16, id="cpu-fp16"),
    pytest.param("cuda", torch.float32, marks=GPU, id="cuda-fp32"),
    pytest.param("cuda", torch.float16, marks=GPU, id="cuda-fp16"),
    pytest.param("cuda", torch.bfloat16, marks=GPU, id="cuda-bf16"),
]
FP32_DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", marks=GPU, id="cuda"),
]

_TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=3e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0,
                 what: str = "") -> None:
    """Compare in fp32 with ``dtype``'s tolerance; ``scale`` widens it for long reductions."""
    tol = _TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol["atol"] * scale, rtol=tol["rtol"] * scale,
                               msg=lambda m: f"{what}: {m}")


def leaf(tensor: torch.Tensor, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A fresh leaf in ``dtype`` on ``device`` that records its gradient."""
    return tensor.to(device=device, dtype=dtype).detach().requires_grad_()


def twin(tensor: torch.Tensor) -> torch.Tensor:
    """The same values as a float64 leaf: the input the torch reference differentiates."""
    return tensor.detach().double().requires_grad_()
