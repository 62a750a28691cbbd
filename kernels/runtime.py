"""Where a kernel runs: compiled Triton on CUDA, Triton's interpreter on CPU, or the torch fallback.

Triton chooses between its compiler and its interpreter when ``@triton.jit`` decorates a function,
reading ``TRITON_INTERPRET`` at that moment (triton 3.x ``knobs.runtime.interpret``). Our kernels are
decorated when ``kernels`` is imported, which in a shared test session or a node runtime may happen
long before anyone sets the variable. :func:`jit` therefore makes the choice at *launch* time instead:
one object serves both the compiler and the interpreter, so setting or clearing ``TRITON_INTERPRET``
at any point before a launch is enough. Nothing here touches the GPU driver at import time.
"""

import os
from typing import Any, Callable

import torch
import triton
from triton import knobs
from triton.runtime.jit import JITFunction

# Passed to every compiled launch. Triton 3.9 warns when FP fusion is left to its default (the
# default flips in 3.10); under a ``filterwarnings = error`` test session that warning is a failure,
# and fused multiply-add is what we want anyway. The interpreter ignores unknown launch options.
COMPILE_OPTIONS: dict[str, Any] = {"enable_fp_fusion": True}


def interpreting() -> bool:
    """True when Triton launches go through its CPU interpreter (``TRITON_INTERPRET=1`` now)."""
    return bool(knobs.runtime.interpret)


def use_triton(device: torch.device | str) -> bool:
    """Whether the ops run their real Triton kernels for tensors on ``device``.

    CUDA tensors: when a CUDA device is present (compiled kernels; through the interpreter if
    ``TRITON_INTERPRET=1``). CPU tensors: only under the interpreter; otherwise the ops fall back
    to plain torch so CPU-only nodes still train. Other devices (mps, xpu): torch fallback.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "cpu":
        return interpreting()
    return False


def require_same_device(*tensors: torch.Tensor | None) -> None:
    """Fail with a readable message instead of a Triton pointer error on mixed devices."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


class ModalJITFunction(JITFunction):
    """A ``JITFunction`` that defers compiler-versus-interpreter to each launch or device call.

    Compiled mode is the plain ``JITFunction`` (the code generator recognises subclasses). When the
    interpreter is on, launches and device-function calls go to a lazily built
    ``InterpretedFunction`` over the same Python source.
    """

    def __init__(self, fn: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(fn, **kwargs)
        self._interpreted: Any = None

    def _interpreter(self) -> Any:
        if self._interpreted is None:
            from triton.runtime.interpreter import InterpretedFunction

            self._interpreted = InterpretedFunction(self.fn)
        return self._interpreted

    def run(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        if interpreting():
            return self._interpreter().run(*args, grid=grid, warmup=warmup, **kwargs)
        return super().run(*args, grid=grid, warmup=warmup, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Only reached when a kernel runs under the interpreter and calls this as a device
        # function; the compiler inlines JITFunctions without calling them.
        if interpreting():
            return self._interpreter()(*args, **kwargs)
        return super().__call__(*args, **kwargs)


def jit(fn: Callable[..., Any]) -> ModalJITFunction:
    """``@triton.jit`` whose interpreter/compiler choice is made per launch (see module docstring)."""
    return ModalJITFunction(fn)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors to size persistent grids; a small stand-in under the interpreter."""
    if device.type == "cuda" and not interpreting():
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    # The interpreter runs programs one after another, so fewer programs means less Python overhead,
    # but more than one keeps the cross-program reduction paths exercised.
    return 4


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (Triton block sizes must be powers of two)."""
    return int(triton.next_power_of_2(max(int(n), 1)))


def row_warps(block: int) -> int:
    """Warps for a one-row-per-program kernel: enough threads to keep 16-byte loads in flight."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def env_flag(name: str) -> bool:
    """A boolean environment variable (``1``/``true``/``yes``)."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
