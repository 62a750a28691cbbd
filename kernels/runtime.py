"""Where a kernel runs: compiled Triton on CUDA, Triton's interpreter on CPU, or the torch fallback.

Triton chooses between its compiler and its interpreter when ``@triton.jit`` decorates a function,
reading ``TRITON_INTERPRET`` at that moment (triton 3.x ``knobs.runtime.interpret``). Our kernels are
decorated when ``kernels`` is imported, which in a shared test session or a node runtime may happen
long before anyone sets the variable. :func:`jit` therefore makes the choice at *launch* time instead:
one object serves both the compiler and the interpreter, so setting or clearing ``TRITON_INTERPRET``
at any point before a launch is enough. Triton's own ``@jit`` helpers (``tl.sum``, ``tl.cdiv``, ...)
were decorated for whichever mode was on when triton was imported, so a launch in the other mode
swaps in twins for its duration. Nothing here touches the GPU driver at import time.
"""

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import triton
import triton.language as tl
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


_STDLIB_TWINS: dict[int, Any] = {}  # id(triton's own helper) -> the same source in the other mode


def _interpreted(fn: Callable[..., Any]) -> Any:
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)


@contextlib.contextmanager
def _stdlib_for(interpret: bool) -> Iterator[None]:
    """Give triton.language's own ``@jit`` helpers the form this launch needs, then restore them.

    They were built for whichever mode was on when triton was imported. Under the interpreter a
    kernel calls ``tl.sum`` and friends as plain Python, which a ``JITFunction`` refuses; the
    compiler in turn cannot inline an ``InterpretedFunction``. The helpers live as attributes of
    these namespaces (module globals, so their calls to each other follow the swap) and as
    ``tl.tensor`` methods. When they already match (the usual case) this costs one isinstance.
    """
    from triton.runtime.interpreter import InterpretedFunction

    wrong_kind = JITFunction if interpret else InterpretedFunction
    if not isinstance(tl.standard.sum, wrong_kind):
        yield
        return
    patched = []
    for namespace in (tl, tl.standard, tl.random, tl.tensor):
        for name, value in list(vars(namespace).items()):
            if isinstance(value, wrong_kind) and not isinstance(value, ModalJITFunction):
                twin = _STDLIB_TWINS.get(id(value))
                if twin is None:
                    twin = _STDLIB_TWINS[id(value)] = _interpreted(value.fn) if interpret else JITFunction(value.fn)
                patched.append((namespace, name, value))
                setattr(namespace, name, twin)
    try:
        yield
    finally:
        for namespace, name, value in patched:
            setattr(namespace, name, value)


_MISSING = object()


@contextlib.contextmanager
def _triton_language_restored() -> Iterator[None]:
    """Undo whatever an interpreted launch leaves patched in triton.language.

    The interpreter swaps ``tl``'s builtins for numpy versions during a launch, but its device-
    function calls (``tl.sum`` and other helpers running interpreted) patch ``triton.language.core``
    without restoring it. Harmless in a process that only ever interprets; here a later compiled
    launch in the same process would trip over it, so every attribute is put back as it was.
    """
    namespaces = (tl, tl.core, tl.tensor, tl.math, tl.standard, tl.random, tl.dtype, tl.condition,
                  tl.core.tensor_descriptor_base)
    saved = [(namespace, dict(vars(namespace))) for namespace in namespaces]
    try:
        yield
    finally:
        for namespace, before in saved:
            now = vars(namespace)
            for name, value in before.items():
                if now.get(name, _MISSING) is not value:
                    setattr(namespace, name, value)


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
            self._interpreted = _interpreted(self.fn)
        return self._interpreted

    def run(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        if interpreting():
            with _triton_language_restored(), _stdlib_for(interpret=True):
                return self._interpreter().run(*args, grid=grid, warmup=warmup, **kwargs)
        with _stdlib_for(interpret=False):
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


def block_warps(elements: int) -> int:
    """Warps for a block of ``elements`` held in registers: about 16-32 elements a thread."""
    if elements >= 32768:
        return 32
    if elements >= 8192:
        return 16
    if elements >= 2048:
        return 8
    return 4


# Largest row a norm kernel keeps in registers; wider rows would spill.
MAX_NORM_COLS = 65536


def row_tile(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_M, num_warps) for kernels that hold BLOCK_M whole rows in registers.

    Narrow rows are packed several to a program so each one still moves ~4k elements, which keeps
    enough loads in flight to saturate HBM at hidden sizes of 1k and below.
    """
    if n_cols > MAX_NORM_COLS:
        raise ValueError(f"rows of {n_cols} features exceed the {MAX_NORM_COLS} a norm kernel holds")
    block_n = next_power_of_2(n_cols)
    block_m = max(1, min(16, 4096 // block_n))
    return block_n, block_m, block_warps(block_n * block_m)


def as_rows(x: torch.Tensor, n_cols: int) -> torch.Tensor:
    """A (rows, n_cols) view with unit column stride, copying only when the layout demands it."""
    x2 = x.reshape(-1, n_cols)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def row_programs(n_rows: int, block_m: int, num_warps: int, device: torch.device) -> int:
    """Programs for a kernel whose programs each walk a range of rows (norm backward passes).

    Enough resident programs to fill every SM's thread slots, never more than there are row tiles;
    each writes one row of column partial sums, so more programs also means a bigger partial buffer.
    """
    per_sm = max(1, 2048 // (32 * num_warps))
    return max(1, min(sm_count(device) * per_sm, -(-n_rows // block_m)))
