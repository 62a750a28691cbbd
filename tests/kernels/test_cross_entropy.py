"""cross_entropy / CrossEntropyLoss against an inline torch reference: loss and logits gradient."""

import pytest
import torch
import torch.nn.functional as F

import kernels
from tests.kernels.cases import DEVICE_DTYPES, FP32_DEVICES, assert_close, leaf, twin

# (rows, vocab): a 1x1, vocabularies that are not a multiple of the interpreter's 64-column
# chunks (so every row is swept in several chunks with a masked tail), and one inside one chunk.
SHAPES = [(1, 1), (13, 300), (37, 64), (4, 1000)]


def reference(logits: torch.Tensor, target: torch.Tensor, reduction: str, ignore_index: int = -100) -> torch.Tensor:
    logp = logits.log_softmax(-1)
    keep = target != ignore_index
    nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    if reduction == "none":
        return nll
    return nll.sum() / keep.sum() if reduction == "mean" else nll.sum()


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("rows, vocab", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_gradient_match_torch(device: str, dtype: torch.dtype, rows: int, vocab: int, reduction: str) -> None:
    torch.manual_seed(0)
    logits = leaf(torch.randn(rows, vocab) * 3, dtype, device)
    target = torch.randint(0, vocab, (rows,))
    target[1::3] = -100  # every third row ignored (none when there is one row)
    target = target.to(device)
    loss = kernels.cross_entropy(logits, target, reduction=reduction)
    grad_out = (torch.rand(loss.shape) + 0.5).to(device=device, dtype=dtype)  # exercises the rescale kernel
    loss.backward(grad_out)

    ref_logits = twin(logits)
    ref = reference(ref_logits, target, reduction)
    ref.backward(grad_out.double())
    assert loss.dtype == dtype and loss.shape == ref.shape
    assert_close(loss, ref, dtype, scale=4.0, what="loss")
    assert_close(logits.grad, ref_logits.grad, dtype, what="grad logits")


@pytest.mark.parametrize("device", FP32_DEVICES)
def test_leading_dims_ignore_index_and_unit_grad(device: str) -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 70, device=device, requires_grad=True)
    target = torch.randint(0, 70, (2, 3), device=device)
    target[0, 1] = 5  # a custom ignore_index, also a valid class id
    loss = kernels.cross_entropy(logits, target, ignore_index=5)
    loss.backward()  # grad_output exactly 1: the rescale kernel returns early
    ref_logits = twin(logits)
    ref = reference(ref_logits.view(-1, 70), target.view(-1), "mean", ignore_index=5)
    ref.backward()
    assert_close(loss, ref, torch.float32, what="loss")
    assert_close(logits.grad, ref_logits.grad, torch.float32, what="grad logits")


@pytest.mark.parametrize("device", FP32_DEVICES)
def test_inplace_grad_reuses_logits_memory(device: str) -> None:
    torch.manual_seed(2)
    hidden = torch.randn(3, 3, 130, device=device, requires_grad=True)
    target = torch.randint(0, 130, (9,), device=device)
    # An intermediate nothing else saved, flattened through a view, as an LM head's output is.
    logits = (hidden * 2.0).flatten(0, 1)
    loss = kernels.cross_entropy(logits, target, inplace_grad=True)
    (loss * 3.0).backward()
    ref_hidden = twin(hidden)
    ref = F.cross_entropy((ref_hidden * 2.0).flatten(0, 1), target)
    (ref * 3.0).backward()
    assert_close(loss, ref, torch.float32, what="loss")
    assert_close(hidden.grad, ref_hidden.grad, torch.float32, what="grad through the overwritten logits")

    saved_by_exp = torch.randn(4, 10, device=device, requires_grad=True).exp()  # exp saves its output
    kernels.cross_entropy(saved_by_exp, torch.zeros(4, dtype=torch.long, device=device), inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved_by_exp.sum().backward()  # autograd notices instead of using the overwritten values


def test_all_ignored_mean_is_nan_like_torch() -> None:
    logits = torch.randn(3, 8, requires_grad=True)
    target = torch.full((3,), -100)
    loss = kernels.cross_entropy(logits, target)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(logits, target))
    assert kernels.cross_entropy(logits, target, reduction="sum").item() == 0.0


def test_no_grad_forward_writes_no_gradient() -> None:
    logits = torch.randn(5, 40)
    target = torch.randint(0, 40, (5,))
    with torch.no_grad():
        loss = kernels.cross_entropy(logits, target, reduction="none")
    assert_close(loss, F.cross_entropy(logits, target, reduction="none"), torch.float32, what="loss")


def test_module_is_a_drop_in() -> None:
    logits = torch.randn(6, 12)
    target = torch.tensor([0, 3, -1, 11, 2, -1])
    for reduction in ("mean", "sum", "none"):
        ours = kernels.CrossEntropyLoss(ignore_index=-1, reduction=reduction)(logits, target)
        theirs = torch.nn.CrossEntropyLoss(ignore_index=-1, reduction=reduction)(logits, target)
        assert_close(ours, theirs, torch.float32, what=reduction)
    with pytest.raises(ValueError, match="reduction"):
        kernels.CrossEntropyLoss(reduction="batchmean")
