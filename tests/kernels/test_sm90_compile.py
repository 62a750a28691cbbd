"""Every kernel compiles, through ptxas, to an sm_90 (H100/H200) cubin - no GPU needed.

The interpreter checks the kernels' arithmetic but not what only the compiler enforces (loop-carried
types, constexpr branches, layouts, shared-memory budgets). Triton's wheel bundles the CUDA backend
and ptxas, so the compiled path is checked here too, for the configurations the ops launch.
"""

import re

import pytest
import torch
import triton

from kernels.ops import adamw, cross_entropy, layer_norm, linear_act, rms_norm
from kernels.runtime import COMPILE_OPTIONS, ModalJITFunction

try:
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401  (the CUDA backend is bundled)
    from triton.compiler import ASTSource
except ImportError as error:  # pragma: no cover - a triton build without the CUDA backend
    pytest.skip(f"triton's CUDA backend is not installed: {error}", allow_module_level=True)

H200 = GPUTarget("cuda", 90, 32)
POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64",
           torch.int32: "*i32"}
BF16, FP32 = torch.bfloat16, torch.float32


@pytest.fixture(autouse=True)
def fresh_compile_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache hit from an earlier run would skip the very compilation these tests exist to check."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton-cache")))


def compile_for_h200(kernel: ModalJITFunction, args: dict[str, object], **options: int) -> str:
    """Compile ``kernel`` for sm_90 with pointer args given as dtypes (16-byte aligned, as our
    tensors are), ints and floats as sample values, constexprs as values; returns the PTX."""
    signature, constants, attrs = {}, {}, {}
    for index, name in enumerate(kernel.arg_names):
        value = args[name]
        if kernel.params[index].is_constexpr:
            signature[name] = "constexpr"
            constants[(index,)] = value
        elif isinstance(value, torch.dtype):
            signature[name] = POINTER[value]
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if isinstance(value, float) else "i32"
    source = ASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=H200, options={**COMPILE_OPTIONS, **options})
    assert compiled.asm["cubin"], "ptxas produced no cubin"
    return compiled.asm["ptx"]


def matmul_config(dtype: torch.dtype) -> triton.Config:
    # fp32 is exact ("ieee", torch's default precision): plain FMAs, so the tile that fits in fp32.
    return linear_act._GPU_CONFIGS[3 if dtype == FP32 else 0]


def matmul_args(dtype: torch.dtype, **flags: object) -> dict[str, object]:
    config = matmul_config(dtype).kwargs
    return dict(a_ptr=dtype, b_ptr=dtype, c_ptr=dtype, bias_ptr=dtype, slope_out_ptr=dtype, slope_in_ptr=dtype,
                rowsum_ptr=FP32, M=4096, N=4096, K=4096, stride_am=4096, stride_ak=1, stride_bk=1, stride_bn=4096,
                stride_cm=4096, stride_cn=1, stride_sm=4096, stride_sk=1,
                PRECISION=linear_act._dot_precision(dtype), **config, **flags)


MATMULS = {
    "forward bf16 gelu": (BF16, dict(ACTIVATION=2, HAS_BIAS=True, STORE_SLOPE=True, SCALE_A=False, ROWSUM_A=False)),
    "inference fp16 silu": (torch.float16, dict(ACTIVATION=3, HAS_BIAS=True, STORE_SLOPE=False, SCALE_A=False,
                                                ROWSUM_A=False)),
    "forward fp32 relu": (FP32, dict(ACTIVATION=1, HAS_BIAS=False, STORE_SLOPE=True, SCALE_A=False, ROWSUM_A=False)),
    "grad input fp16": (torch.float16, dict(ACTIVATION=0, HAS_BIAS=False, STORE_SLOPE=False, SCALE_A=True,
                                                 ROWSUM_A=False)),
    "grad weight+bias bf16": (BF16, dict(ACTIVATION=0, HAS_BIAS=False, STORE_SLOPE=False, SCALE_A=True,
                                         ROWSUM_A=True)),
}


@pytest.mark.parametrize("case", list(MATMULS))
def test_matmul_compiles_to_tensor_core_code(case: str) -> None:
    dtype, flags = MATMULS[case]
    config = matmul_config(dtype)
    ptx = compile_for_h200(linear_act._matmul_kernel, matmul_args(dtype, **flags),
                           num_warps=config.num_warps, num_stages=config.num_stages)
    if dtype != FP32:
        assert "wgmma" in ptx, "expected Hopper warpgroup MMA instructions"


def test_norm_kernels_compile() -> None:
    block_n, block_m, warps = 4096, 1, 16
    common = dict(M=4096, N=4096, BLOCK_M=block_m, BLOCK_N=block_n)
    compile_for_h200(layer_norm._layer_norm_fwd_kernel, dict(
        x_ptr=BF16, w_ptr=BF16, b_ptr=BF16, y_ptr=BF16, mean_ptr=FP32, rstd_ptr=FP32, stride_x=4096, stride_y=4096,
        eps=1e-5, HAS_WEIGHT=True, HAS_BIAS=True, **common), num_warps=warps)
    for has_weight in (True, False):  # the no-affine branch never defines the weight
        compile_for_h200(layer_norm._layer_norm_bwd_kernel, dict(
            x_ptr=BF16, w_ptr=BF16, dy_ptr=BF16, dx_ptr=BF16, mean_ptr=FP32, rstd_ptr=FP32, dw_partial_ptr=FP32,
            db_partial_ptr=FP32, stride_x=4096, stride_dy=4096, stride_dx=4096, rows_per_program=31,
            HAS_WEIGHT=has_weight, **common), num_warps=warps)
    compile_for_h200(rms_norm._rms_norm_fwd_kernel, dict(
        x_ptr=BF16, w_ptr=BF16, y_ptr=BF16, rstd_ptr=FP32, stride_x=4096, stride_y=4096, eps=1e-6, HAS_WEIGHT=True,
        **common), num_warps=warps)
    compile_for_h200(rms_norm._rms_norm_bwd_kernel, dict(
        x_ptr=BF16, w_ptr=BF16, dy_ptr=BF16, dx_ptr=BF16, rstd_ptr=FP32, dw_partial_ptr=FP32, stride_x=4096,
        stride_dy=4096, stride_dx=4096, rows_per_program=31, HAS_WEIGHT=True, **common), num_warps=warps)


@pytest.mark.parametrize("mean, compute_grad", [(True, True), (False, True), (False, False)],
                         ids=["mean", "sum-or-none", "no-grad"])
def test_cross_entropy_kernels_compile(mean: bool, compute_grad: bool) -> None:
    compile_for_h200(cross_entropy._cross_entropy_fwd_kernel, dict(
        logits_ptr=BF16, target_ptr=torch.int64, loss_ptr=FP32, grad_ptr=BF16, n_valid_ptr=torch.int64,
        stride_logits=131072, stride_grad=131072, V=131072, ignore_index=-100, MEAN=mean, COMPUTE_GRAD=compute_grad,
        BLOCK_V=32768), num_warps=32)
    compile_for_h200(cross_entropy._scale_rows_kernel, dict(
        grad_ptr=BF16, scale_ptr=FP32, stride_grad=131072, V=131072, PER_ROW=not mean, BLOCK_V=32768), num_warps=32)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_adamw_kernel_compiles_with_vector_loads(dtype: torch.dtype) -> None:
    align = 16 // torch.empty(0, dtype=dtype).element_size()
    ptx = compile_for_h200(adamw._adamw_kernel, dict(
        p_base=dtype, g_base=dtype, offsets_ptr=torch.int64, numels_ptr=torch.int64, chunk_tensor_ptr=torch.int32,
        chunk_start_ptr=torch.int64, decay=0.99, one_minus_beta1=0.1, beta2=0.999, one_minus_beta2=0.001,
        step_size=1e-3, bias_correction2_sqrt=0.5, eps=1e-8, MAXIMIZE=False, P_ALIGN=align, G_ALIGN=align,
        BLOCK=4096), num_warps=8)
    # Addresses come from a table; without the alignment hints every load would be scalar.
    assert re.search(r"ld\.global(\.\S+)?\.v4", ptx), "full blocks should use 128-bit loads"
