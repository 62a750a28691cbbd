"""``layer_norm`` over the last dimension: one read and one write forward, one pass backward.

Forward keeps whole rows in registers (statistics in fp32), writes ``y`` and saves only the
per-row mean and 1/std (8 bytes a row) for backward. Backward runs a few programs per SM, each
walking a contiguous range of rows: it writes ``dx`` row by row and keeps the ``dweight``/``dbias``
partial sums in fp32 registers, so those column reductions cost one small ``(programs, N)`` buffer
and a torch sum instead of a second pass over ``dy`` and ``x`` (Triton tutorial, Liger-Kernel).
"""

import torch
import triton
import triton.language as tl

from kernels.runtime import (
    COMPILE_OPTIONS,
    as_rows,
    jit,
    require_same_device,
    row_programs,
    row_tile,
    use_triton,
)


@jit
def _layer_norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, stride_x, stride_y, M, N, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols < N)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / N + eps)
    y = centered * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@jit
def _layer_norm_bwd_kernel(
    x_ptr, w_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, dw_partial_ptr, db_partial_ptr,
    stride_x, stride_dy, stride_dx, M, N, rows_per_program,
    HAS_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for first in range(row_start, row_end, BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy * w[None, :] if HAS_WEIGHT else dy
        c1 = tl.sum(x_hat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (x_hat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += dy * x_hat
        db_acc += dy
    tl.store(dw_partial_ptr + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    tl.store(db_partial_ptr + pid * N + cols, tl.sum(db_acc, axis=0), mask=col_mask)


class LayerNormFunction(torch.autograd.Function):
    """Autograd wrapper; saves x, weight and the per-row (mean, rstd)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,  # type: ignore[override]
                n_cols: int, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
        x2 = as_rows(x, n_cols)
        n_rows = x2.shape[0]
        block_n, block_m, num_warps = row_tile(n_cols)
        y = torch.empty((n_rows, n_cols), device=x.device, dtype=out_dtype)
        mean = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        _layer_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
            x2, weight if weight is not None else x2, bias if bias is not None else x2, y, mean, rstd,
            x2.stride(0), y.stride(0), n_rows, n_cols, eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=num_warps, **COMPILE_OPTIONS,
        )
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.n_cols = n_cols
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x2, weight, mean, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = as_rows(dy, n_cols)
        block_n, block_m, num_warps = row_tile(n_cols)
        programs = row_programs(n_rows, block_m, num_warps, x2.device)
        dx = torch.empty((n_rows, n_cols), device=x2.device, dtype=x2.dtype)
        dw_partial = torch.empty((programs, n_cols), device=x2.device, dtype=torch.float32)
        db_partial = torch.empty_like(dw_partial)
        _layer_norm_bwd_kernel[(programs,)](
            x2, weight if weight is not None else x2, dy2, dx, mean, rstd, dw_partial, db_partial,
            x2.stride(0), dy2.stride(0), dx.stride(0), n_rows, n_cols, triton.cdiv(n_rows, programs),
            HAS_WEIGHT=weight is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=num_warps, **COMPILE_OPTIONS,
        )
        dweight = dw_partial.sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = db_partial.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return dx.view(dy.shape), dweight, dbias, None, None, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5) -> torch.Tensor:
    """Layer norm over the trailing ``weight.shape`` dimensions (the last one when weight is None).

    Same result as ``F.layer_norm(x, weight.shape, weight, bias, eps)``. Statistics are fp32 whatever
    the input dtype; under autocast the output is fp32, as torch's autocast does for layer_norm.
    """
    reference = weight if weight is not None else bias
    normalized_shape = tuple(reference.shape) if reference is not None else (x.shape[-1],)
    if tuple(x.shape[x.dim() - len(normalized_shape):]) != normalized_shape:
        raise ValueError(f"x {tuple(x.shape)} does not end with normalized shape {normalized_shape}")
    autocast = torch.is_autocast_enabled(x.device.type)
    if not use_triton(x.device) or x.numel() == 0:
        if autocast:
            x = x.float()
        return torch.nn.functional.layer_norm(x, normalized_shape, weight, bias, eps)
    require_same_device(x, weight, bias)
    n_cols = 1
    for size in normalized_shape:
        n_cols *= size
    flat_w = None if weight is None else weight.reshape(-1)
    flat_b = None if bias is None else bias.reshape(-1)
    out_dtype = torch.float32 if autocast else x.dtype
    return LayerNormFunction.apply(x, flat_w, flat_b, n_cols, eps, out_dtype)
