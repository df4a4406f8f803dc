"""When the meta-step is compiled, and how: the policy behind ``--compile auto`` and the
inductor options of the compiled pieces, per device type. The measurements behind each
choice are in docs/performance-cpu.md and docs/performance-gpu.md (result files named
beside each constant)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .pieces import piecewise_unsupported

if TYPE_CHECKING:
    from ..algorithms.base import MetaAlgorithm
    from ..config import Config

MODES = ("auto", "on", "off")  # CUDA graph replay
COMPILE = ("off", "step", "pieces")  # torch.compile: not at all, the whole step, its pieces
# --compile auto compiles the pieces for schedules at least this long, where their time
# saved repays their compilation (train_pieces_vs_eager_cpu.json,
# train_solve_vs_eager_cpu.json, gpu/race{1,2}_*_h200*)
AUTO_COMPILE_MIN_STEPS = {"cuda": 5000, "cpu": 1000}
# inductor options for the pieces on the CPU: no channels-last layouts, faster on both
# machines measured (cpu_pieces_layout*.json, cpu_variants_amd_epyc_interleaved.json)
CPU_PIECES_OPTIONS = {"layout_optimization": False}
# on CUDA: no persistent reductions, without which Triton failed to compile the solve
# piece (gpu/race1_*_h200)
CUDA_PIECES_OPTIONS = {"triton.persistent_reductions": False}
# the linear solve as one compiled piece (the support gradient linearised once per task)
# rather than one compiled product per solver step (cpu_pieces_solve*.json,
# gpu/race{1,2}_*_h200*, run_h200_solve_*)
SOLVE_PIECE = {"cpu": True, "cuda": True}
# on the solve path, a convolutional network's query gradient runs task by task from this
# many query images per task on, where vmap's grouped convolutions are slower than dense
# ones (query_per_task.json); not on CUDA, where per-task launches are what graphs avoid
QUERY_PER_TASK = {"cpu": 40, "cuda": None}


def auto_hvp_mode(device: torch.device | str, compile: str) -> str:
    """``--hvp-mode auto``: forward-over-reverse products (``"fwd"``) for the compiled
    pieces on CUDA, reverse-over-reverse (``"rev"``) otherwise. On an H200 the compiled
    product pieces took 16.4 against 17.6 ms per omniglot-5w1s meta-step with ``fwd`` in one
    process (gpu_step_compiled.json), 15.7 ms in another loan; uncompiled, ``fwd`` was the
    slower (33.2 against 32.0 ms in the graph), and on the CPU no faster
    (cpu_pieces_tried.json, benchmarks/hvp_modes.py)."""
    return "fwd" if torch.device(device).type == "cuda" and compile == "pieces" else "rev"


def auto_compile(
    settings: MetaAlgorithm | Config,
    device: torch.device | str,
    *,
    steps: int,
    algo: str | None = None,
) -> str:
    """``--compile auto``: ``"pieces"`` for a schedule of at least
    ``AUTO_COMPILE_MIN_STEPS[device type]`` meta-steps where the pieces apply (iMAML, GD
    inner steps, ``piecewise_unsupported``), else ``"off"``. ``settings`` is an algorithm
    or a run's ``Config`` (then ``algo`` names the algorithm), so that training can choose
    before it builds the algorithm. ``steps`` is the whole schedule, not the steps left, so
    that a resumed run makes the uninterrupted run's choice."""
    least = AUTO_COMPILE_MIN_STEPS.get(torch.device(device).type)
    if least is None or steps < least:
        return "off"
    if piecewise_unsupported(settings, algo=settings.name if algo is None else algo) is not None:
        return "off"
    return "pieces"


def one_line(e: Exception) -> str:
    """``Type: first line of the message`` (inductor's errors run to pages)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
