"""``linear_act``: ``act(x @ weight.T + bias)`` as one Triton matmul with a fused epilogue.

Forward: one matmul kernel adds the bias and applies the activation on the fp32 accumulator
before the single store, and (when a backward will follow) also stores ``act'(z)``, the
activation's derivative at the pre-activation ``z``. Saving ``act'(z)`` instead of ``z`` costs the
same memory as eager (which saves ``z`` for GELU's backward) but moves the erf/exp work to the
epilogue, where it runs once per output element.

Backward: ``grad_z = grad_y * act'(z)`` is never materialised. Both backward matmuls multiply it
in while loading their left operand (one multiply per element, cheap next to the tensor-core
work), and the weight-gradient kernel also sums that operand over rows, which is the bias
gradient, so the bias costs no extra pass. Two launches in all, versus eager's activation
backward kernel, two GEMMs and a reduction.
"""

import torch
import triton
import triton.language as tl

from kernels.ops.activation import (
    activation_and_derivative,
    activation_code,
    apply_activation,
    torch_activation,
)
from kernels.runtime import COMPILE_OPTIONS, interpreting, jit, require_same_device, use_triton


@jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, slope_out_ptr, slope_in_ptr, rowsum_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_sm, stride_sk,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_SLOPE: tl.constexpr,
    SCALE_A: tl.constexpr, ROWSUM_A: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] = epilogue(prologue(A)[M, K] @ B[K, N]), any strides.

    Prologue (SCALE_A): A is multiplied elementwise by ``slope_in`` (same shape as A, its own
    strides), i.e. grad_y * act'(z). ROWSUM_A: the programs of the first column block also store
    the fp32 row sums of that scaled A (the bias gradient). Epilogue: + bias[N], activation, and
    with STORE_SLOPE the activation's derivative into ``slope_out`` (laid out like C).
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks walk the column blocks together, so each B panel is
    # reused from L2 by several programs before it is evicted (Triton matmul tutorial).
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # 64-bit row offsets: rows * stride passes 2**31 elements at LM-head sizes.
    rows_a = offs_m.to(tl.int64)[:, None]
    a_ptrs = a_ptr + rows_a * stride_am + offs_k[None, :] * stride_ak
    s_ptrs = slope_in_ptr + rows_a * stride_sm + offs_k[None, :] * stride_sk
    b_ptrs = b_ptr + offs_k.to(tl.int64)[:, None] * stride_bk + offs_n[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        mask_k = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if SCALE_A:
            slope = tl.load(s_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            scaled = a.to(tl.float32) * slope.to(tl.float32)
            if ROWSUM_A:
                rowsum += tl.sum(scaled, axis=1)
            a = scaled.to(a_ptr.dtype.element_ty)
            s_ptrs += BLOCK_K * stride_sk
        elif ROWSUM_A:
            rowsum += tl.sum(a.to(tl.float32), axis=1)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if ROWSUM_A:
        if pid_n == 0:
            tl.store(rowsum_ptr + offs_m, rowsum, mask=mask_m)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    c_offsets = offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = mask_m[:, None] & mask_n[None, :]
    if STORE_SLOPE:
        out, slope_out = activation_and_derivative(acc, ACTIVATION)
        tl.store(slope_out_ptr + c_offsets, slope_out.to(slope_out_ptr.dtype.element_ty), mask=c_mask)
    else:
        out = apply_activation(acc, ACTIVATION)
    tl.store(c_ptr + c_offsets, out.to(c_ptr.dtype.element_ty), mask=c_mask)


# Hopper-friendly tiles from the Triton matmul tutorial; the autotuner picks per shape on the GPU.
# Configs that do not fit (e.g. the widest tile in fp32) are skipped by the autotuner.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
]
_matmul_tuned = triton.autotune(
    configs=_GPU_CONFIGS,
    key=["M", "N", "K", "stride_am", "stride_bk", "ACTIVATION", "HAS_BIAS", "STORE_SLOPE", "SCALE_A", "ROWSUM_A"],
)(_matmul_kernel)
# The interpreter runs each program in numpy: small tiles keep odd test shapes cheap and still
# cover the multi-block, masked-edge paths.
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own switch: exact ("ieee") unless the user allowed TF32.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _matmul(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, bias: torch.Tensor | None = None,
    activation: int = 0, slope_out: torch.Tensor | None = None, slope_in: torch.Tensor | None = None,
    rowsum: torch.Tensor | None = None,
) -> None:
    """Launch ``_matmul_kernel`` for 2-D (possibly transposed) views; see its docstring."""
    M, K = a.shape
    N = b.shape[1]
    dummy = out  # unused pointer arguments still need a valid pointer
    scale = slope_in if slope_in is not None else a
    args = (
        a, b, out, bias if bias is not None else dummy, slope_out if slope_out is not None else dummy,
        scale, rowsum if rowsum is not None else dummy, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        scale.stride(0), scale.stride(1),
    )
    flags = dict(
        ACTIVATION=activation, HAS_BIAS=bias is not None, STORE_SLOPE=slope_out is not None,
        SCALE_A=slope_in is not None, ROWSUM_A=rowsum is not None, PRECISION=_dot_precision(a.dtype),
    )

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if interpreting():
        _matmul_kernel[grid](*args, **flags, **_INTERPRETER_CONFIG)
    else:
        _matmul_tuned[grid](*args, **flags, **COMPILE_OPTIONS)


class LinearActFunction(torch.autograd.Function):
    """Autograd wrapper: saves x, weight and act'(z); backward is two fused matmuls."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                activation: int) -> torch.Tensor:
        out_features, in_features = weight.shape
        x2 = x.reshape(-1, in_features)
        y = torch.empty((x2.shape[0], out_features), device=x.device, dtype=x.dtype)
        needs_grad = any(ctx.needs_input_grad[:3])
        slope = torch.empty_like(y) if needs_grad and activation != 0 else None
        _matmul(x2, weight.t(), y, bias=bias, activation=activation, slope_out=slope)
        ctx.save_for_backward(x2, weight, slope)
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # type: ignore[override]
        x2, weight, slope = ctx.saved_tensors
        out_features, in_features = weight.shape
        grad_y2 = grad_y.reshape(-1, out_features)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x2 = torch.empty_like(x2, memory_format=torch.contiguous_format)
            _matmul(grad_y2, weight, grad_x2, slope_in=slope)
            grad_x = grad_x2.view(*grad_y.shape[:-1], in_features)
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)
            rowsum = None
            if ctx.needs_input_grad[2]:
                rowsum = torch.empty(out_features, device=weight.device, dtype=torch.float32)
            _matmul(grad_y2.t(), x2, grad_w, slope_in=None if slope is None else slope.t(), rowsum=rowsum)
            grad_b = None if rowsum is None else rowsum.to(weight.dtype)
        elif ctx.needs_input_grad[2]:
            # Frozen weight, trainable bias: a reduction alone is enough.
            grad_z = grad_y2.float() if slope is None else grad_y2.float() * slope.float()
            grad_b = grad_z.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None


def torch_linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     activation: str = "gelu") -> torch.Tensor:
    """The torch composition ``linear_act`` computes; the fallback where Triton does not run."""
    return torch_activation(torch.nn.functional.linear(x, weight, bias), activation)


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               activation: str = "gelu") -> torch.Tensor:
    """``act(x @ weight.T + bias)`` with ``weight`` laid out like ``nn.Linear`` (out, in).

    ``x`` is ``(..., in_features)``; activation is ``"gelu"`` (exact erf), ``"relu"``, ``"silu"`` or
    ``"none"``. Runs the Triton kernels where :func:`kernels.use_triton` says so, else torch.
    Under autocast, inputs are cast to the autocast dtype as ``F.linear`` would be.
    """
    code = activation_code(activation)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if not use_triton(x.device) or x.numel() == 0:
        return torch_linear_act(x, weight, bias, activation)
    require_same_device(x, weight, bias)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x (..., {x.shape[-1]}) does not match weight {tuple(weight.shape)} (out, in)")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}, "
                        f"{None if bias is None else bias.dtype}")
    return LinearActFunction.apply(x, weight, bias, code)
