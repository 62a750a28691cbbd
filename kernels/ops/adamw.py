"""The AdamW update as one multi-tensor Triton launch per bucket of parameters.

A bucket is every parameter of a group that shares device, dtype and step count. Its tensors
stay where they are (no flattening, no copies): a small device table gives each tensor's
parameter, gradient and moment addresses as element offsets from two base pointers, and a chunk
table maps each program to (tensor, start). Each program updates one ``BLOCK`` of one tensor:
read p, g, m, v once, write p, m, v once - the minimum traffic an AdamW step can move.

Tables are rebuilt only when an address changes; with the caching allocator, gradients usually
come back at the same addresses every step, so the steady state is one launch and no host work
beyond a dictionary lookup. Tensors the kernel cannot address (non-contiguous, misaligned, or
with moments in another dtype) take :func:`torch_adamw_` instead; that is a layout fallback,
not a device one.
"""

from dataclasses import dataclass

import torch
import triton.language as tl

from kernels.runtime import COMPILE_OPTIONS, interpreting, jit

_ALIGN_BYTES = 16  # what lets the compiler issue 128-bit loads from a table-computed address


@jit
def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, numel, decay, one_minus_beta1, beta2, one_minus_beta2,
                 step_size, bias_correction2_sqrt, eps, MAXIMIZE: tl.constexpr, MASKED: tl.constexpr):
    # Unmasked blocks keep their loads vectorisable; only a tensor's last block pays for the mask.
    mask = offs < numel if MASKED else None
    other = 0.0 if MASKED else None
    p = tl.load(p_ptr + offs, mask=mask, other=other).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=other).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=other).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=other).to(tl.float32)
    if MAXIMIZE:
        g = -g
    # The order of torch.optim.AdamW's single-tensor path, with IEEE-rounded sqrt and division,
    # so fp32 results agree with torch to an ulp or two.
    p = p * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)


@jit
def _adamw_kernel(
    p_base, g_base, offsets_ptr, numels_ptr, chunk_tensor_ptr, chunk_start_ptr,
    decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps,
    MAXIMIZE: tl.constexpr, P_ALIGN: tl.constexpr, G_ALIGN: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    tensor = tl.load(chunk_tensor_ptr + pid).to(tl.int64)
    start = tl.multiple_of(tl.load(chunk_start_ptr + pid), BLOCK)
    numel = tl.load(numels_ptr + tensor)
    p_ptr = p_base + tl.multiple_of(tl.load(offsets_ptr + tensor * 4), P_ALIGN)
    g_ptr = g_base + tl.multiple_of(tl.load(offsets_ptr + tensor * 4 + 1), G_ALIGN)
    m_ptr = p_base + tl.multiple_of(tl.load(offsets_ptr + tensor * 4 + 2), P_ALIGN)
    v_ptr = p_base + tl.multiple_of(tl.load(offsets_ptr + tensor * 4 + 3), P_ALIGN)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, numel, decay, one_minus_beta1, beta2, one_minus_beta2,
                     step_size, bias_correction2_sqrt, eps, MAXIMIZE, False)
    else:
        _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, numel, decay, one_minus_beta1, beta2, one_minus_beta2,
                     step_size, bias_correction2_sqrt, eps, MAXIMIZE, True)


@dataclass(frozen=True)
class AdamWHyper:
    """One bucket's scalars, already combined the way torch combines them (in float64 on the host)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: float
    maximize: bool = False

    @property
    def step_size(self) -> float:
        return self.lr / (1.0 - self.beta1**self.step)

    @property
    def bias_correction2_sqrt(self) -> float:
        return (1.0 - self.beta2**self.step) ** 0.5


@dataclass(frozen=True)
class AdamWTables:
    """Device tables addressing one bucket's tensors from ``params[0]`` and ``grads[0]``."""

    offsets: torch.Tensor  # int64 (tensors, 4): element offsets of p, g, m, v from the bases
    numels: torch.Tensor  # int64 (tensors,)
    chunk_tensor: torch.Tensor  # int32 (chunks,): which tensor a program updates
    chunk_start: torch.Tensor  # int64 (chunks,): where in that tensor its block starts
    block: int


def block_size() -> int:
    # 4k fp32 elements over 8 warps: 16 a thread, four 128-bit loads per stream. The interpreter
    # gets small blocks so the tests' small tensors still span several chunks and a masked tail.
    return 256 if interpreting() else 4096


def kernel_can_address(tensors: list[torch.Tensor], dtype: torch.dtype) -> bool:
    """True when the kernel may update these (p, g, m, v) of one parameter in place."""
    return all(t.is_contiguous() and t.data_ptr() % _ALIGN_BYTES == 0 for t in tensors) and all(
        t.dtype == dtype for t in tensors[2:])


def build_tables(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                 exp_avg_sqs: list[torch.Tensor]) -> AdamWTables:
    """Offsets and chunk tables for one bucket (every tensor passed :func:`kernel_can_address`)."""
    block = block_size()
    p_base, g_base = params[0].data_ptr(), grads[0].data_ptr()
    p_size, g_size = params[0].element_size(), grads[0].element_size()
    offsets, numels, chunk_tensor, chunk_start = [], [], [], []
    for index, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
        offsets.append([(p.data_ptr() - p_base) // p_size, (g.data_ptr() - g_base) // g_size,
                        (m.data_ptr() - p_base) // p_size, (v.data_ptr() - p_base) // p_size])
        numels.append(p.numel())
        starts = range(0, p.numel(), block)
        chunk_tensor.extend([index] * len(starts))
        chunk_start.extend(starts)
    device = params[0].device

    def to_device(values: list, dtype: torch.dtype) -> torch.Tensor:
        host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
        return host.to(device, non_blocking=True)

    return AdamWTables(to_device(offsets, torch.int64), to_device(numels, torch.int64),
                       to_device(chunk_tensor, torch.int32), to_device(chunk_start, torch.int64), block)


def fused_adamw_(params: list[torch.Tensor], grads: list[torch.Tensor], tables: AdamWTables,
                 hyper: AdamWHyper) -> None:
    """Update one bucket in place with a single launch (params, grads: the tables' bases)."""
    chunks = tables.chunk_tensor.numel()
    if chunks == 0:
        return
    _adamw_kernel[(chunks,)](
        params[0], grads[0], tables.offsets, tables.numels, tables.chunk_tensor, tables.chunk_start,
        1.0 - hyper.lr * hyper.weight_decay, 1.0 - hyper.beta1, hyper.beta2, 1.0 - hyper.beta2,
        hyper.step_size, hyper.bias_correction2_sqrt, hyper.eps,
        MAXIMIZE=hyper.maximize, P_ALIGN=_ALIGN_BYTES // params[0].element_size(),
        G_ALIGN=_ALIGN_BYTES // grads[0].element_size(), BLOCK=tables.block,
        num_warps=8, **COMPILE_OPTIONS,
    )


@torch.no_grad()
def torch_adamw_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 hyper: AdamWHyper) -> None:
    """The same update in torch ops (torch.optim.AdamW's single-tensor path), for the fallbacks."""
    if hyper.maximize:
        grad = -grad
    param.mul_(1.0 - hyper.lr * hyper.weight_decay)
    exp_avg.lerp_(grad, 1.0 - hyper.beta1)
    exp_avg_sq.mul_(hyper.beta2).addcmul_(grad, grad, value=1.0 - hyper.beta2)
    denom = (exp_avg_sq.sqrt() / hyper.bias_correction2_sqrt).add_(hyper.eps)
    param.addcdiv_(exp_avg, denom, value=-hyper.step_size)
