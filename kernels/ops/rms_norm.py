"""``rms_norm`` over the last dimension: ``x / sqrt(mean(x**2) + eps) * weight``.

Same layout as ``layer_norm`` (see that module): rows in registers, fp32 statistics, only the
per-row 1/rms saved, and a backward whose ``dweight`` column sums stay in per-program fp32
registers until one small partial buffer is summed by torch.
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
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, M, N, eps,
    HAS_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols < N)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    y = x * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@jit
def _rms_norm_bwd_kernel(
    x_ptr, w_ptr, dy_ptr, dx_ptr, rstd_ptr, dw_partial_ptr,
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
    for first in range(row_start, row_end, BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        x_hat = x * rstd[:, None]
        wdy = dy * w[None, :] if HAS_WEIGHT else dy
        # d/dx of x * rstd(x): rstd * (wdy - x_hat * mean(wdy * x_hat))
        dx = (wdy - x_hat * (tl.sum(wdy * x_hat, axis=1) / N)[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += dy * x_hat
    tl.store(dw_partial_ptr + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper; saves x, weight and the per-row 1/rms."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float,  # type: ignore[override]
                out_dtype: torch.dtype) -> torch.Tensor:
        n_cols = x.shape[-1]
        x2 = as_rows(x, n_cols)
        n_rows = x2.shape[0]
        block_n, block_m, num_warps = row_tile(n_cols)
        y = torch.empty((n_rows, n_cols), device=x.device, dtype=out_dtype)
        rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
            x2, weight if weight is not None else x2, y, rstd, x2.stride(0), y.stride(0), n_rows, n_cols, eps,
            HAS_WEIGHT=weight is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=num_warps, **COMPILE_OPTIONS,
        )
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = as_rows(dy, n_cols)
        block_n, block_m, num_warps = row_tile(n_cols)
        programs = row_programs(n_rows, block_m, num_warps, x2.device)
        dx = torch.empty((n_rows, n_cols), device=x2.device, dtype=x2.dtype)
        dw_partial = torch.empty((programs, n_cols), device=x2.device, dtype=torch.float32)
        _rms_norm_bwd_kernel[(programs,)](
            x2, weight if weight is not None else x2, dy2, dx, rstd, dw_partial,
            x2.stride(0), dy2.stride(0), dx.stride(0), n_rows, n_cols, triton.cdiv(n_rows, programs),
            HAS_WEIGHT=weight is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=num_warps, **COMPILE_OPTIONS,
        )
        dweight = dw_partial.sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        return dx.view(dy.shape), dweight, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """RMS norm over the last dimension, as ``F.rms_norm(x, (x.shape[-1],), weight, eps)``.

    Statistics are fp32 whatever the input dtype; under autocast the output is fp32.
    """
    if weight is not None and tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"weight {tuple(weight.shape)} does not match the last dimension of x {tuple(x.shape)}")
    autocast = torch.is_autocast_enabled(x.device.type)
    if not use_triton(x.device) or x.numel() == 0:
        if autocast:
            x = x.float()
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    require_same_device(x, weight)
    out_dtype = torch.float32 if autocast else x.dtype
    return RMSNormFunction.apply(x, weight, eps, out_dtype)
