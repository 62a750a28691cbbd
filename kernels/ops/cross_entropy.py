"""``cross_entropy``: softmax + NLL in one kernel that also writes the gradient (Liger-Kernel style).

One program per row walks the vocabulary in chunks of at most ``_MAX_BLOCK_V`` columns, so any
vocabulary size fits in registers: a first sweep keeps a running max and rescaled sum of
exponentials (online softmax) and picks out the target logit; when a backward will follow, a second
sweep writes ``(softmax - onehot) * scale`` straight into the gradient buffer. Neither a softmax
nor a log-softmax of the full size is ever kept, which is where eager spends its memory
(log-softmax saved, then two full-size buffers in backward).

The gradient lands in a fresh buffer by default. With ``inplace_grad=True`` it overwrites the
logits themselves, so the whole loss needs no memory beyond the logits; the logits are then
garbage after the call, which is only safe when nothing else reads them (a final LM head).
Backward multiplies by the incoming gradient in place, and skips even that pass when it is
exactly 1 (``loss.backward()`` on a mean or sum), without a host sync: the kernel reads the
scale on the device and returns early.
"""

import torch
import triton
import triton.language as tl

from kernels.runtime import COMPILE_OPTIONS, interpreting, jit, require_same_device, use_triton

_REDUCTIONS = ("mean", "sum", "none")


@jit
def _cross_entropy_fwd_kernel(
    logits_ptr, target_ptr, loss_ptr, grad_ptr, n_valid_ptr, stride_logits, stride_grad, V, ignore_index,
    MEAN: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits
    target = tl.load(target_ptr + row).to(tl.int64)
    valid = target != ignore_index
    cols = tl.arange(0, BLOCK_V)

    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, V, BLOCK_V):
        x = tl.load(row_ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    in_range = valid & (target >= 0) & (target < V)
    target_logit = tl.load(row_ptr + target, mask=in_range, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target_logit, 0.0))

    if COMPUTE_GRAD:
        scale = 1.0
        if MEAN:
            scale = 1.0 / tl.maximum(tl.load(n_valid_ptr).to(tl.float32), 1.0)
        scale = tl.where(valid, scale, 0.0)
        grad_row_ptr = grad_ptr + row * stride_grad
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(start + cols == target, 1.0, 0.0)
            tl.store(grad_row_ptr + start + cols, (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask)


@jit
def _scale_rows_kernel(grad_ptr, scale_ptr, stride_grad, V, PER_ROW: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    scale = tl.load(scale_ptr + row) if PER_ROW else tl.load(scale_ptr)
    scale = scale.to(tl.float32)
    # grad_output is exactly 1 after loss.backward() on a reduced loss: nothing to do.
    if scale != 1.0:
        ptrs = grad_ptr + row * stride_grad + cols
        grad = tl.load(ptrs, mask=cols < V, other=0.0).to(tl.float32)
        tl.store(ptrs, (grad * scale).to(grad_ptr.dtype.element_ty), mask=cols < V)


def _block_v(vocab: int) -> tuple[int, int]:
    # Compiled: 32k-column chunks over 32 warps hold 32 fp32 values a thread (Liger's choice).
    # Interpreter: tiny chunks so the tests' small vocabularies still take the multi-chunk path.
    limit = 64 if interpreting() else 32768
    block = min(triton.next_power_of_2(vocab), limit)
    return block, 32 if block >= 32768 else max(4, block // 1024)


class CrossEntropyFunction(torch.autograd.Function):
    """Forward computes loss and (scaled) gradient; backward only rescales the saved gradient."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int,  # type: ignore[override]
                reduction: str, inplace_grad: bool, out_dtype: torch.dtype) -> torch.Tensor:
        vocab = logits.shape[-1]
        logits2 = logits.reshape(-1, vocab)
        if logits2.stride(-1) != 1:
            logits2 = logits2.contiguous()
        target1 = target.reshape(-1)
        n_rows = logits2.shape[0]
        compute_grad = ctx.needs_input_grad[0]
        grad = None
        if compute_grad:
            grad = logits2 if inplace_grad else torch.empty_like(logits2, memory_format=torch.contiguous_format)
        loss_rows = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
        n_valid = (target1 != ignore_index).sum()
        block_v, num_warps = _block_v(vocab)
        _cross_entropy_fwd_kernel[(n_rows,)](
            logits2, target1, loss_rows, grad if grad is not None else logits2, n_valid,
            logits2.stride(0), (grad if grad is not None else logits2).stride(0), vocab, ignore_index,
            MEAN=reduction == "mean", COMPUTE_GRAD=compute_grad, BLOCK_V=block_v,
            num_warps=num_warps, **COMPILE_OPTIONS,
        )
        if compute_grad and inplace_grad and grad.data_ptr() == logits.data_ptr():
            # Tell autograd the logits changed, so a node that saved them fails loudly, not silently.
            torch.autograd.graph.increment_version(logits)
            # Save the input itself: a view made here would be refused once its base was bumped.
            grad = logits
        ctx.save_for_backward(grad)
        ctx.logits_shape = logits.shape
        ctx.reduction = reduction
        if reduction == "none":
            return loss_rows.to(out_dtype).view(target.shape)
        loss = loss_rows.sum()
        if reduction == "mean":
            loss = loss / n_valid
        return loss.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        vocab = ctx.logits_shape[-1]
        grad = grad.reshape(-1, vocab)
        n_rows = grad.shape[0]
        per_row = ctx.reduction == "none"
        scale = grad_output.reshape(-1) if per_row else grad_output.reshape(1)
        block_v, num_warps = _block_v(vocab)
        _scale_rows_kernel[(n_rows, triton.cdiv(vocab, block_v))](
            grad, scale.contiguous(), grad.stride(0), vocab, PER_ROW=per_row, BLOCK_V=block_v,
            num_warps=num_warps, **COMPILE_OPTIONS,
        )
        return grad.view(ctx.logits_shape), None, None, None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", *, inplace_grad: bool = False) -> torch.Tensor:
    """Cross-entropy of ``logits`` (..., V) against class indices ``target`` (...).

    Matches ``F.cross_entropy`` for 2-D logits; extra leading dimensions are flattened (the class
    dimension is the last one, unlike torch's (N, C, d1...) layout). ``reduction``: ``"mean"`` over
    non-ignored targets, ``"sum"`` or ``"none"`` (ignored rows give 0). ``inplace_grad=True`` writes
    the gradient into ``logits`` during forward to save a logits-sized buffer; the logits must not
    be read afterwards (see the module docstring). The loss has the logits' dtype (fp32 under
    autocast, as torch's autocast gives).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"target {tuple(target.shape)} must match logits {tuple(logits.shape)} without the last dim")
    autocast = torch.is_autocast_enabled(logits.device.type)
    if not use_triton(logits.device) or logits.numel() == 0:
        flat = logits.reshape(-1, logits.shape[-1])
        loss = torch.nn.functional.cross_entropy(
            flat.float() if autocast else flat, target.reshape(-1), ignore_index=ignore_index, reduction=reduction)
        return loss.view(target.shape) if reduction == "none" else loss
    require_same_device(logits, target)
    if inplace_grad and logits.is_leaf and logits.requires_grad:
        raise ValueError("inplace_grad=True would overwrite a leaf tensor that requires grad")
    out_dtype = torch.float32 if autocast else logits.dtype
    return CrossEntropyFunction.apply(logits, target, ignore_index, reduction, inplace_grad, out_dtype)
