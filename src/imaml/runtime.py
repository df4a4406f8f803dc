"""The device, dtype and CPU settings a run (training or evaluation) starts with."""

from __future__ import annotations

import torch

from .config import Config
from .malloc import keep_freed_memory


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return torch.device(name)


def setup_runtime(cfg: Config) -> tuple[torch.device, torch.dtype]:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        # subnormal floats slowed some CPU runs 5-20× (docs/notebook/prototypes.md)
        torch.set_flush_denormal(True)
        if cfg.cpu_malloc == "keep":
            keep_freed_memory()  # no page faults for the same big tensors every step
    return device, getattr(torch, cfg.dtype)


# Fixed offsets separate the random streams derived from one seed.
TASK_STREAM, VAL_STREAM, TEST_STREAM = 1_000_003, 2_000_003, 3_000_017
