"""What this host can run: its capabilities for registration, the device each slot trains on,
the CPU threads each job gets, and the free GPU memory that heartbeats report.

torch is imported only on a host with an NVIDIA driver: importing it takes 1-2 s, and a node should
register at once. Without the driver's device nodes and /proc entry no CUDA device can exist, so a
CPU host answers from the OS alone (and job processes import torch, not the runtime).
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from typing import Any


def usable_cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def total_ram_mb() -> int:
    """Physical memory of the host in MB (0 when the platform does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20)
    except (ValueError, OSError, AttributeError):
        return 0


def nvidia_driver_present() -> bool:
    """Whether the NVIDIA kernel driver is loaded: its /proc entry or a /dev/nvidia* device node."""
    return Path("/proc/driver/nvidia").exists() or any(Path("/dev").glob("nvidia*"))


def torch_version() -> str | None:
    """The installed torch's version, read from its package metadata (no import)."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def cuda_usable(device_policy: str) -> bool:
    """Whether jobs on this node train on CUDA: ``auto`` when a GPU is present, ``cuda`` demands one."""
    if device_policy == "cpu":
        return False
    if not nvidia_driver_present():
        if device_policy == "cuda":
            raise RuntimeError("--device cuda was asked for, but this host has no NVIDIA driver loaded "
                               f"(no /proc/driver/nvidia, no /dev/nvidia*; torch {torch_version()})")
        return False
    import torch

    available = torch.cuda.is_available()
    if device_policy == "cuda" and not available:
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device "
                           f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    return available


def detect_capabilities(device_policy: str = "auto") -> dict[str, Any]:
    """The capabilities object of the registration body, from real device properties."""
    gpus: list[dict[str, Any]] = []
    cuda_version = None
    if cuda_usable(device_policy):
        import torch

        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"name": props.name, "memory_mb": int(props.total_memory // 2**20),
                         "compute_capability": f"{props.major}.{props.minor}"})
        cuda_version = torch.version.cuda if gpus else None
    return {
        "device": "cuda" if gpus else "cpu",
        "gpus": gpus,
        "cpu_cores": usable_cpu_cores(),
        "ram_mb": total_ram_mb(),
        "cuda_version": cuda_version,
        "torch_version": torch_version(),
    }


def device_for_slot(capabilities: dict[str, Any], slot: int) -> str:
    """The device a job in this slot trains on: slots are spread over the GPUs, else the CPU."""
    gpus = capabilities.get("gpus") or []
    if not gpus:
        return "cpu"
    return f"cuda:{slot % len(gpus)}"


def threads_per_job(slots: int, override: int | None = None, cores: int | None = None) -> int:
    """CPU threads for one job's torch ops: the slots share the cores, one core is left to the
    runtime itself (heartbeats, uploads) on small hosts. Oversubscribing the cores makes small
    models train many times slower, as the threads spin waiting for each other."""
    if override:
        return override
    cores = cores or usable_cpu_cores()
    spare = 1 if cores <= 8 else 0
    return max(1, (cores - spare) // max(1, slots))


def gpu_free_mb() -> int | None:
    """Free memory over all GPUs in MB through NVML (no CUDA context in the runtime process), or None
    when there is no GPU or no NVML binding."""
    try:
        import pynvml  # nvidia-ml-py, shipped with CUDA builds of torch
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            free = 0
            for index in range(pynvml.nvmlDeviceGetCount()):
                free += pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).free
            return int(free // 2**20)
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None
