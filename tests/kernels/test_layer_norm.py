"""layer_norm / LayerNorm against an inline torch reference: outputs and every gradient."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from tests.kernels.cases import DEVICE_DTYPES, FP32_DEVICES, assert_close, leaf, twin

# Odd widths, a 1x1, rows that are not a multiple of the rows-per-program tile (16 rows of 8,
# 1 row of 300), and enough rows that the backward's programs each walk several tiles.
SHAPES = [(3, 7, 41), (1, 1), (130, 8), (5, 300)]


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_torch(device: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    n = shape[-1]
    x = leaf(torch.randn(shape) * 3 + 1, dtype, device)
    weight = leaf(torch.randn(n), dtype, device)
    bias = leaf(torch.randn(n), dtype, device)
    y = kernels.layer_norm(x, weight, bias, eps=1e-5)
    grad_y = torch.randn(shape).to(device=device, dtype=dtype)
    y.backward(grad_y)

    xr, wr, br = twin(x), twin(weight), twin(bias)
    F.layer_norm(xr, (n,), wr, br, 1e-5).backward(grad_y.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, F.layer_norm(xr, (n,), wr, br, 1e-5), dtype, what="output")
    rows = max(1.0, (x.numel() // n) ** 0.5)
    assert_close(x.grad, xr.grad, dtype, scale=2.0, what="grad x")
    assert_close(weight.grad, wr.grad, dtype, scale=rows, what="grad weight")
    assert_close(bias.grad, br.grad, dtype, scale=rows, what="grad bias")


@pytest.mark.parametrize("device", FP32_DEVICES)
def test_without_affine_and_multi_dim_shape(device: str) -> None:
    torch.manual_seed(1)
    x = torch.randn(6, 4, 5, device=device, requires_grad=True)
    weight = torch.randn(4, 5, device=device, requires_grad=True)
    kernels.layer_norm(x, weight, None).sum().backward()
    xr, wr = twin(x), twin(weight)
    F.layer_norm(xr, (4, 5), wr, None).sum().backward()
    assert_close(x.grad, xr.grad, torch.float32, what="grad x")
    assert_close(weight.grad, wr.grad, torch.float32, what="grad weight")

    plain = torch.randn(9, 33, device=device)
    assert_close(kernels.layer_norm(plain, None, None), F.layer_norm(plain, (33,)), torch.float32, what="no affine")


def test_module_is_a_drop_in_for_layer_norm() -> None:
    ours, theirs = kernels.LayerNorm(24), nn.LayerNorm(24)
    assert ours.normalized_shape == theirs.normalized_shape == (24,)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    for name, value in ours.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[name])
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 24)
    assert_close(ours(x), theirs(x), torch.float32, what="module output")
    nobias = kernels.LayerNorm(24, bias=False)
    assert nobias.bias is None and list(nobias.state_dict()) == ["weight"]
    x2 = torch.randn(4, 2, 3)
    assert_close(kernels.LayerNorm((2, 3), elementwise_affine=False)(x2), F.layer_norm(x2, (2, 3)), torch.float32)


def test_rejects_mismatched_shape() -> None:
    with pytest.raises(ValueError, match="normalized shape"):
        kernels.layer_norm(torch.randn(3, 4), torch.ones(5), None)
