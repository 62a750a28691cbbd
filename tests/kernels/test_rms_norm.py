"""rms_norm / RMSNorm against an inline torch reference: outputs and every gradient."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from tests.kernels.cases import DEVICE_DTYPES, FP32_DEVICES, assert_close, leaf, twin

SHAPES = [(3, 7, 41), (1, 1), (130, 8), (5, 300)]


def reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 if weight is None else weight)


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_torch(device: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    n = shape[-1]
    x = leaf(torch.randn(shape) * 2, dtype, device)
    weight = leaf(torch.randn(n), dtype, device)
    y = kernels.rms_norm(x, weight, eps=1e-6)
    grad_y = torch.randn(shape).to(device=device, dtype=dtype)
    y.backward(grad_y)

    xr, wr = twin(x), twin(weight)
    yr = reference(xr, wr, 1e-6)
    yr.backward(grad_y.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, yr, dtype, what="output")
    assert_close(x.grad, xr.grad, dtype, scale=2.0, what="grad x")
    assert_close(weight.grad, wr.grad, dtype, scale=max(1.0, (x.numel() // n) ** 0.5), what="grad weight")


@pytest.mark.parametrize("device", FP32_DEVICES)
def test_without_weight(device: str) -> None:
    torch.manual_seed(1)
    x = torch.randn(7, 19, device=device, requires_grad=True)
    kernels.rms_norm(x, None).square().sum().backward()
    xr = twin(x)
    reference(xr, None, 1e-6).square().sum().backward()
    assert_close(x.grad, xr.grad, torch.float32, what="grad x")


def test_module_is_a_drop_in_for_rms_norm() -> None:
    ours, theirs = kernels.RMSNorm(24), nn.RMSNorm(24, eps=1e-6)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    assert torch.equal(ours.weight, theirs.weight)
    with torch.no_grad():
        theirs.weight.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 24)
    assert_close(ours(x), theirs(x), torch.float32, what="module output")
    assert_close(ours(x), F.rms_norm(x, (24,), theirs.weight, 1e-6), torch.float32, what="F.rms_norm")
