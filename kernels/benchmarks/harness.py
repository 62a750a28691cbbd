"""Measuring one benchmark case: its variants side by side (ours, eager, torch.compile), timed,
their peak memory, and the ratios between them; plus the machine facts a result needs.

A :class:`Case` is one op at one size. Each :class:`Variant` is a zero-argument step (forward and
backward, or an optimizer step) over inputs the case built once. Time is the median of CUDA-event
timed repetitions after warm-up (warm-up absorbs autotuning and torch.compile). Memory is the peak
allocated during one step above what was allocated before it, plus the bytes of the inputs the
variant itself uses (so variants sharing one set of inputs are compared on equal terms).
"""

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
OURS = "triton"  # the variant name the ratios are computed for


@dataclass
class Variant:
    """One implementation of a case's step."""

    name: str
    step: Callable[[], Any]
    input_bytes: int = 0  # bytes of tensors this variant needs that exist before the step


@dataclass
class Case:
    """One op at one size, with everything needed to turn times into rates."""

    bench: str
    case: str
    variants: list[Variant]
    bytes_moved: int | None = None  # compulsory memory traffic of one step (for GB/s)
    flops: float | None = None  # for compute-bound ops (TFLOP/s)
    samples: int | None = None  # for training steps (samples/s)
    notes: str = ""


@dataclass
class Settings:
    """How hard to measure: full on a GPU, a few quick repetitions for the CPU smoke run."""

    device: torch.device
    smoke: bool
    warmup: int = 3
    reps: int = 20
    deadline: float = float("inf")  # time.monotonic() after which no new case starts


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], Any], settings: Settings) -> float:
    """Median seconds of one step."""
    for _ in range(settings.warmup):
        step()
    synchronize(settings.device)
    samples = []
    for _ in range(settings.reps):
        if settings.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            step()
            samples.append(time.perf_counter() - begin)
    return statistics.median(samples)


def peak_step_bytes(step: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes allocated during one step above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure_copy_bandwidth(settings: Settings) -> float:
    """Bytes per second of a plain device-to-device copy (read + write), the roofline we report
    against. 1 GiB on the GPU, far above its L2; a token size for the CPU smoke run."""
    size = (1 << 20) if settings.smoke else (1 << 30)
    src = torch.empty(size, dtype=torch.uint8, device=settings.device).fill_(1)
    dst = torch.empty_like(src)
    seconds = time_step(lambda: dst.copy_(src), settings)
    return 2 * size / seconds


def run_case(case: Case, settings: Settings, copy_bandwidth: float) -> list[dict[str, Any]]:
    """Time and measure every variant of a case; one result row per variant, with ratios to ours."""
    rows = []
    for variant in case.variants:
        row: dict[str, Any] = {"bench": case.bench, "case": case.case, "variant": variant.name, "notes": case.notes}
        try:
            seconds = time_step(variant.step, settings)
            extra = peak_step_bytes(variant.step, settings.device)
        except Exception as error:  # one broken baseline must not sink the whole run
            row["error"] = f"{type(error).__name__}: {error}"[:500]
            rows.append(row)
            continue
        row["median_ms"] = seconds * 1e3
        if case.bytes_moved is not None:
            row["gb_per_s"] = case.bytes_moved / seconds / 1e9
            row["pct_of_copy_bw"] = 100.0 * case.bytes_moved / seconds / copy_bandwidth
        if case.flops is not None:
            row["tflop_per_s"] = case.flops / seconds / 1e12
        if case.samples is not None:
            row["samples_per_s"] = case.samples / seconds
        if extra is not None:
            row["peak_mb"] = (extra + variant.input_bytes) / 2**20
            row["extra_peak_mb"] = extra / 2**20
        rows.append(row)
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Speed and memory of ours relative to each baseline: >1 means ours is faster / smaller."""
    by_name = {row["variant"]: row for row in rows if "median_ms" in row}
    for ours_name, ours in by_name.items():
        if not ours_name.startswith(OURS):
            continue
        for base in ("eager", "compile"):
            if base not in by_name:
                continue
            ours[f"speedup_vs_{base}"] = by_name[base]["median_ms"] / ours["median_ms"]
            if ours.get("peak_mb"):
                ours[f"memory_ratio_vs_{base}"] = by_name[base]["peak_mb"] / ours["peak_mb"]


def machine_facts(device: torch.device) -> dict[str, Any]:
    """GPU, versions and the commit, so a result file stands on its own."""
    import triton

    facts: dict[str, Any] = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                     sm_count=props.multi_processor_count, compute_capability=f"{props.major}.{props.minor}")
    return facts


def _git(*args: str) -> str:
    try:
        result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Total storage of some tensors (for :attr:`Variant.input_bytes`)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def fwd_bwd(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], *args: Any,
            grad_out: torch.Tensor | None = None) -> Callable[[], None]:
    """A step running ``fn(*inputs, *args)`` forward and backward, clearing the inputs' grads first
    so every repetition allocates gradients afresh instead of accumulating into old ones."""

    def step() -> None:
        for tensor in inputs:
            tensor.grad = None
        out = fn(*inputs, *args)
        out.backward(grad_out)

    return step


def compiled(fn: Callable[..., Any], settings: Settings) -> Callable[..., Any]:
    """torch.compile on the GPU; in the CPU smoke run the "eager" backend, which exercises dynamo
    without needing a C++ toolchain or minutes of inductor compilation."""
    return torch.compile(fn, dynamic=False, backend="eager" if settings.smoke else "inductor")


def fwd_bwd_case(bench: str, label: str, inputs: list[torch.Tensor], grad_out: torch.Tensor,
                 ours: Callable[..., torch.Tensor], eager: Callable[..., torch.Tensor], settings: Settings,
                 **measures: Any) -> Case:
    """The usual triple for an op taking ``inputs``: ours, torch eager, and eager under torch.compile,
    each run forward and backward against ``grad_out``; ``measures`` are :class:`Case` fields."""
    size = tensor_bytes(*inputs, grad_out)
    variants = [Variant(name, fwd_bwd(fn, inputs, grad_out=grad_out), size)
                for name, fn in (("triton", ours), ("eager", eager), ("compile", compiled(eager, settings)))]
    return Case(bench, f"{label} {str(inputs[0].dtype).removeprefix('torch.')}", variants, **measures)
