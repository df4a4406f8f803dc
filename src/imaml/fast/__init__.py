"""The meta-step's fast paths, apart from the math they speed up.

An iMAML meta-step on omniglot-5w1s is thousands of small kernels (16 inner steps of
forward and backward, the Hessian-vector products, the query gradient) over a few GFLOP,
so eager PyTorch spends most of it launching kernels. Two remedies, each tested equal to
the plain ``alg.meta_grad_tensors`` in float64:

- ``graph``: on CUDA, ``MetaStep`` captures the step (which does no host-device
  synchronisation on the batched path) as one ``torch.cuda.CUDAGraph`` on its first call
  and afterwards only copies the parameters and the batch into the graph's static inputs
  and replays it; a new batch shape is captured again (up to ``max_graphs``), and where
  capture fails ``mode="auto"`` falls back to the eager step (``fallback_reason``).
- ``torch.compile``: ``compile="step"`` compiles the whole step (minutes); with
  ``compile="pieces"`` (iMAML with plain GD inner steps) ``pieces`` cuts iMAML's
  meta-gradient into one inner step, the query gradient and the linear solve (or one
  product with I + H/λ per solver step), each compiled once and reused by the loops.

``policy`` says what ``--compile auto`` picks per device type and schedule length, with
which inductor options, and ``MetaStep(fallback=True)`` turns a failed compilation or
capture into a warning and a slower step. The measurements behind every choice are in
docs/performance-cpu.md and docs/performance-gpu.md.
"""

from .pieces import Pieces, make_pieces, meta_grad_piecewise, piecewise_unsupported
from .policy import (
    AUTO_COMPILE_MIN_STEPS,
    COMPILE,
    CPU_PIECES_OPTIONS,
    CUDA_PIECES_OPTIONS,
    MODES,
    QUERY_PER_TASK,
    SOLVE_PIECE,
    auto_compile,
    auto_hvp_mode,
    one_line,
)
from .step import MetaStep

__all__ = [
    "AUTO_COMPILE_MIN_STEPS",
    "COMPILE",
    "CPU_PIECES_OPTIONS",
    "CUDA_PIECES_OPTIONS",
    "MODES",
    "MetaStep",
    "Pieces",
    "QUERY_PER_TASK",
    "SOLVE_PIECE",
    "auto_compile",
    "auto_hvp_mode",
    "meta_grad_piecewise",
    "one_line",
    "make_pieces",
    "piecewise_unsupported",
]
