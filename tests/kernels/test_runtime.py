"""Where ops run: Triton kernels (interpreter/CUDA) with no silent fallback, torch elsewhere, and
an import that never touches the GPU driver."""

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.runtime import ModalJITFunction
from tests.kernels.cases import assert_close

REPO = Path(__file__).resolve().parents[2]


def run_every_op() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(6, 20, requires_grad=True)
    weight = torch.randn(12, 20, requires_grad=True)
    h = kernels.linear_act(x, weight, None, "gelu")
    h = kernels.layer_norm(h, torch.ones(12), torch.zeros(12))
    h = kernels.rms_norm(h, torch.ones(12))
    loss = kernels.cross_entropy(h, torch.arange(6))
    loss.backward()
    optimizer = kernels.AdamW([weight])
    optimizer.step()
    return {"loss": loss.detach(), "grad_x": x.grad, "weight": weight.detach()}


def torch_reference() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(6, 20, requires_grad=True)
    weight = torch.randn(12, 20, requires_grad=True)
    h = F.gelu(F.linear(x, weight))
    h = F.layer_norm(h, (12,))
    h = F.rms_norm(h, (12,), torch.ones(12), 1e-6)
    loss = F.cross_entropy(h, torch.arange(6))
    loss.backward()
    optimizer = torch.optim.AdamW([weight])
    optimizer.step()
    return {"loss": loss.detach(), "grad_x": x.grad, "weight": weight.detach()}


def count_launches(monkeypatch: pytest.MonkeyPatch, then: Callable[..., object] | None = None) -> list[str]:
    launched: list[str] = []
    original = ModalJITFunction.run

    def run(self: ModalJITFunction, *args: object, **kwargs: object) -> object:
        launched.append(self.fn.__name__)
        if then is not None:
            return then()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ModalJITFunction, "run", run)
    return launched


def run_fresh_python(script: str, **env: str) -> None:
    """Run ``script`` in a new interpreter (warnings as errors) with only ``env`` set; it must print ok."""
    result = subprocess.run([sys.executable, "-W", "error", "-c", script], cwd=REPO, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **env}, timeout=110)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_use_triton_follows_device_and_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    assert kernels.use_triton("cpu") and kernels.use_triton(torch.device("cpu"))
    assert not kernels.use_triton("meta")
    assert kernels.use_triton("cuda") == torch.cuda.is_available()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not kernels.use_triton("cpu")


def test_interpreter_runs_the_real_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    launched = count_launches(monkeypatch)
    ours = run_every_op()
    expected = {"_matmul_kernel", "_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel", "_rms_norm_fwd_kernel",
                "_rms_norm_bwd_kernel", "_cross_entropy_fwd_kernel", "_scale_rows_kernel", "_adamw_kernel"}
    assert expected <= set(launched)
    for name, value in torch_reference().items():
        assert_close(ours[name], value, torch.float32, what=name)


def test_cpu_without_interpreter_falls_back_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")

    def refuse() -> None:
        raise AssertionError("a Triton kernel was launched for CPU tensors without the interpreter")

    launched = count_launches(monkeypatch, then=refuse)
    ours = run_every_op()
    assert launched == []
    for name, value in torch_reference().items():
        assert_close(ours[name], value, torch.float32, what=name)


def test_import_and_cpu_fallback_never_touch_the_gpu_driver() -> None:
    """A fresh interpreter without TRITON_INTERPRET: importing and training on CPU leave Triton's
    driver unresolved (resolving it raises on a machine without a GPU)."""
    script = (
        "import triton, kernels, torch\n"
        "m = kernels.LinearAct(4, 3); o = kernels.AdamW(m.parameters())\n"
        "kernels.cross_entropy(kernels.RMSNorm(3)(m(torch.randn(2, 4))), torch.tensor([0, 2])).backward()\n"
        "o.step()\n"
        "assert triton.runtime.driver._active is None, 'driver was resolved'\n"
        "print('ok')\n"
    )
    run_fresh_python(script, CUDA_VISIBLE_DEVICES="")


def test_compiled_launch_after_triton_was_imported_for_the_interpreter() -> None:
    """With TRITON_INTERPRET=1 when triton is imported, triton's own helpers (tl.sum, ...) come out
    interpreted; a compiled launch must still get compilable ones. Checked by compiling for sm_90
    inside the same swap ``run`` uses, after an interpreted launch in the same process."""
    script = (
        "import os, torch, triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "import kernels\n"
        "from kernels.runtime import _stdlib_for, COMPILE_OPTIONS\n"
        "from kernels.ops.rms_norm import _rms_norm_fwd_kernel as k\n"
        "kernels.rms_norm(torch.randn(3, 5), torch.ones(5))  # interpreted launch first\n"
        "del os.environ['TRITON_INTERPRET']\n"
        "sig = {n: 'constexpr' if p.is_constexpr else ('*fp32' if n.endswith('_ptr') else\n"
        "       ('fp32' if n == 'eps' else 'i32')) for n, p in zip(k.arg_names, k.params)}\n"
        "const = {(i,): v for i, v in enumerate([None] * 9 + [True, 1, 64]) if v is not None}\n"
        "with _stdlib_for(False):\n"
        "    triton.compile(ASTSource(k, sig, constexprs=const), target=GPUTarget('cuda', 90, 32),\n"
        "                   options=COMPILE_OPTIONS)\n"
        "print('ok')\n"
    )
    run_fresh_python(script, TRITON_INTERPRET="1")
