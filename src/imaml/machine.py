"""What a result was measured on: recorded beside every run and benchmark result.

Speed depends on the processor as much as on the code (the same CPU step ran at different
speeds on a machine with AVX-512 and an AMD EPYC with AVX2 only), so results record
the CPU's model and the instruction set PyTorch's kernels use, not only the architecture.
"""

from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """The machine, as a JSON-ready dict: CPU model and cores, the instruction set of
    PyTorch's CPU kernels (``torch.backends.cpu.get_cpu_capability``), intra-op threads,
    versions, and the CUDA device when there is one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count()
    info = {
        "cpu": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": cores,
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "cuda": None,
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name()
        info["cuda_version"] = torch.version.cuda
    return info
