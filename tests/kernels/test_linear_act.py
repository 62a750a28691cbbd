"""linear_act / LinearAct against an inline torch reference: outputs and every gradient."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from tests.kernels.cases import DEVICE_DTYPES, FP32_DEVICES, assert_close, leaf, twin

TORCH_ACTIVATIONS = {"none": lambda z: z, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    return TORCH_ACTIVATIONS[activation](F.linear(x, weight, bias))


# (leading dims of x, in_features, out_features): odd sizes everywhere, a 1x1, and row/column counts
# that are not multiples of the interpreter's 16-wide tiles.
SHAPES = [((3, 7), 41, 33), ((1,), 1, 1), ((37,), 19, 40)]


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("lead, n_in, n_out", SHAPES)
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "silu"])
def test_forward_and_gradients_match_torch(device: str, dtype: torch.dtype, lead: tuple[int, ...], n_in: int,
                                           n_out: int, activation: str) -> None:
    torch.manual_seed(0)
    x = leaf(torch.randn(*lead, n_in), dtype, device)
    weight = leaf(torch.randn(n_out, n_in) / n_in**0.5, dtype, device)
    bias = leaf(torch.randn(n_out), dtype, device)
    y = kernels.linear_act(x, weight, bias, activation)
    grad_y = torch.randn(y.shape).to(device=device, dtype=dtype)
    y.backward(grad_y)

    xr, wr, br = twin(x), twin(weight), twin(bias)
    yr = reference(xr, wr, br, activation)
    yr.backward(grad_y.double())
    assert y.shape == yr.shape and y.dtype == dtype
    assert_close(y, yr, dtype, what="output")
    reduction = max(1.0, (x.numel() // n_in) ** 0.5)  # dW and db sum over every row
    assert_close(x.grad, xr.grad, dtype, scale=max(1.0, n_out**0.5), what="grad x")
    assert_close(weight.grad, wr.grad, dtype, scale=reduction, what="grad weight")
    assert_close(bias.grad, br.grad, dtype, scale=reduction, what="grad bias")


@pytest.mark.parametrize("device", FP32_DEVICES)
@pytest.mark.parametrize("needs", ["x_only", "weight_only", "bias_only", "no_bias"])
def test_partial_gradients(device: str, needs: str) -> None:
    """Each backward branch: frozen weight, frozen input (first layer), frozen bias, no bias."""
    torch.manual_seed(1)
    x = torch.randn(5, 3, 24, device=device).requires_grad_(needs == "x_only")
    weight = torch.randn(18, 24, device=device).requires_grad_(needs in ("weight_only", "no_bias"))
    bias = None if needs == "no_bias" else torch.randn(18, device=device).requires_grad_(needs == "bias_only")
    kernels.linear_act(x, weight, bias, "gelu").square().sum().backward()
    xr, wr = twin(x), twin(weight)
    br = None if bias is None else twin(bias)
    reference(xr, wr, br, "gelu").square().sum().backward()
    for ours, theirs, name in ((x, xr, "x"), (weight, wr, "weight"), (bias, br, "bias")):
        if ours is not None and ours.requires_grad:
            assert_close(ours.grad, theirs.grad, torch.float32, scale=10.0, what=f"grad {name}")
        elif ours is not None:
            assert ours.grad is None


@pytest.mark.parametrize("device", FP32_DEVICES)
def test_non_contiguous_input(device: str) -> None:
    torch.manual_seed(2)
    x = torch.randn(24, 10, device=device).t().requires_grad_()  # (10, 24) with strides (1, 10)
    weight = torch.randn(12, 24, device=device).requires_grad_()
    kernels.linear_act(x, weight, None, "relu").sum().backward()
    xr, wr = twin(x), twin(weight)
    reference(xr, wr, None, "relu").sum().backward()
    assert_close(x.grad, xr.grad, torch.float32, what="grad x")
    assert_close(weight.grad, wr.grad, torch.float32, scale=10.0, what="grad weight")


def test_module_is_a_drop_in_for_linear() -> None:
    torch.manual_seed(3)
    ours = kernels.LinearAct(20, 12, activation="silu")
    torch.manual_seed(3)
    theirs = nn.Linear(20, 12)
    assert ours.weight.shape == (12, 20) and ours.bias.shape == (12,)
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)  # same init
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 20)
    assert_close(ours(x), F.silu(theirs(x)), torch.float32, what="module output")
    assert kernels.LinearAct(3, 2, bias=False).bias is None


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="activation"):
        kernels.LinearAct(3, 2, activation="tanh")
    with pytest.raises(ValueError, match="does not match"):
        kernels.linear_act(torch.randn(2, 3), torch.randn(4, 5))
    with pytest.raises(TypeError, match="dtype"):
        kernels.linear_act(torch.randn(2, 3), torch.randn(4, 3, dtype=torch.float16))
