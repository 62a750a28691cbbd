"""kernels.AdamW against torch.optim.AdamW: 20 steps, weight decay, groups, checkpoints."""

import io

import pytest
import torch
from torch import nn

import kernels
from tests.kernels.cases import FP32_DEVICES


def model_pair(device: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        # 41x33 weights span several 256-element interpreter blocks plus a masked tail.
        return nn.Sequential(nn.Linear(41, 33), nn.GELU(), nn.Linear(33, 7), nn.LayerNorm(7)).to(device, dtype)

    return build(), build()


def groups(model: nn.Module) -> list[dict]:
    # Different learning rates and weight decays per group, as a node's param groups may have.
    return [{"params": model[0].parameters(), "lr": 3e-2},
            {"params": model[2].parameters(), "lr": 1e-2, "weight_decay": 0.0},
            {"params": model[3].parameters()}]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    """Steps on seeded synthetic gradients: both optimizers see identical gradients every step, so
    the comparison tests the update itself rather than how a model's loss amplifies rounding."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        for param in model.parameters():
            param.grad = torch.randn(param.shape, generator=generator).to(param.device, param.dtype)
        optimizer.step()


def assert_models_match(ours: nn.Module, theirs: nn.Module, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("device", FP32_DEVICES)
def test_twenty_steps_match_torch(device: str) -> None:
    ours, theirs = model_pair(device)
    ours_opt = kernels.AdamW(groups(ours), weight_decay=0.1)
    theirs_opt = torch.optim.AdamW(groups(theirs), weight_decay=0.1)
    train(ours, ours_opt, 20)
    train(theirs, theirs_opt, 20)
    assert_models_match(ours, theirs)
    for p_ours, p_theirs in zip(ours.parameters(), theirs.parameters(), strict=True):
        s_ours, s_theirs = ours_opt.state[p_ours], theirs_opt.state[p_theirs]
        assert set(s_ours) == set(s_theirs) == {"step", "exp_avg", "exp_avg_sq"}
        assert s_ours["step"].item() == s_theirs["step"].item() == 20
        torch.testing.assert_close(s_ours["exp_avg_sq"], s_theirs["exp_avg_sq"], atol=1e-9, rtol=1e-5)


@pytest.mark.gpu
def test_bf16_parameters_track_torch() -> None:
    ours, theirs = model_pair("cuda", torch.bfloat16)
    train(ours, kernels.AdamW(groups(ours)), 20)
    train(theirs, torch.optim.AdamW(groups(theirs)), 20)
    # Ours computes each update in fp32 and rounds once; torch's bf16 path rounds every op.
    assert_models_match(ours, theirs, atol=6e-2, rtol=5e-2)


def test_defaults_and_rejections() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    defaults = kernels.AdamW(params).defaults
    torch_defaults = torch.optim.AdamW(params).defaults
    for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
        assert defaults[key] == torch_defaults[key], key
    with pytest.raises(ValueError, match="amsgrad"):
        kernels.AdamW(params, amsgrad=True)
    with pytest.raises(ValueError, match="learning rate"):
        kernels.AdamW(params, lr=-1.0)


def test_checkpoints_interchange_with_torch() -> None:
    """A checkpoint of either optimizer resumes in the other, and training continues identically."""
    ours, theirs = model_pair("cpu")
    ours_opt, theirs_opt = kernels.AdamW(groups(ours)), torch.optim.AdamW(groups(theirs))
    train(ours, ours_opt, 5)
    train(theirs, theirs_opt, 5)

    buffer = io.BytesIO()
    torch.save(ours_opt.state_dict(), buffer)  # tensors only: torch.load(weights_only=True) accepts it
    buffer.seek(0)
    resumed_in_torch = torch.optim.AdamW(groups(ours))
    resumed_in_torch.load_state_dict(torch.load(buffer, weights_only=True))
    resumed_in_ours = kernels.AdamW(groups(theirs))
    resumed_in_ours.load_state_dict(theirs_opt.state_dict())
    assert resumed_in_ours.param_groups[1]["lr"] == 1e-2

    train(ours, resumed_in_torch, 5, seed=2)
    train(theirs, resumed_in_ours, 5, seed=2)
    assert_models_match(ours, theirs)


def test_maximize_skips_missing_grads_and_odd_layouts() -> None:
    torch.manual_seed(3)
    # A transposed (non-contiguous) parameter takes the torch path; a parameter without a grad is
    # left alone and gets no state, as in torch.
    values = [torch.randn(5, 7).t(), torch.randn(300), torch.randn(4)]
    ours = [nn.Parameter(v.clone()) for v in values]
    theirs = [nn.Parameter(v.clone()) for v in values]
    ours_opt = kernels.AdamW(ours, lr=0.1, maximize=True)
    theirs_opt = torch.optim.AdamW(theirs, lr=0.1, maximize=True)
    for _ in range(3):
        for params, opt in ((ours, ours_opt), (theirs, theirs_opt)):
            opt.zero_grad()
            (params[0].sin().sum() + params[1].cos().sum()).backward()
            opt.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert len(ours_opt.state[ours[2]]) == 0 and torch.equal(ours[2], theirs[2])
