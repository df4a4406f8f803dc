"""The meta-step's fast paths: one CUDA graph (capture once, replay every step), and
``torch.compile``.

An iMAML meta-step on omniglot-5w1s is thousands of small kernels (16 inner steps of
forward and backward, 5 Hessian-vector products, the query gradient) over a few GFLOP:
eager PyTorch spends nearly all of it launching kernels. ``MetaStep`` captures
``alg.meta_grad_tensors`` (which does no host-device synchronisation on the batched
path) into a ``torch.cuda.CUDAGraph`` on the first call and afterwards only copies the
parameters and the task batch into the graph's static inputs and replays it.

It falls back to the eager step where a graph does not apply: on the CPU, on the
per-task loop, when a batch's shape differs from the captured one (the graph is
re-captured for the new shape, up to ``max_graphs``), and, with ``mode="auto"``, when
capture fails (the reason is kept in ``fallback_reason``). ``mode="on"`` makes a
failed capture an error instead.

``compile="step"`` (or ``True``) runs the whole step through ``torch.compile`` (inductor,
static shapes): element-wise chains (BatchNorm, ReLU, the proximal and solver updates)
become fused loops. The first call compiles (measured 5–8 minutes for omniglot-5w1s on 2
CPU cores, ~15 s from a warm inductor cache; then 1.35–1.9× faster per step:
benchmarks/cpu_variants.py); a new batch shape compiles again. It is exact in float64
(tests/test_compile.py). On an H200 (16 CPU cores) its compilation did not finish within
400 s.

``compile="pieces"`` (iMAML with plain GD inner steps) compiles the three batched pieces
of ``IMAML.meta_grad_piecewise`` instead, one inner step, the query gradient and one
Hessian-vector product, each once, and runs the inner and solver loops over them: about
80 s to compile on 2 CPU cores or on the H200, exact in float64 (tests/test_piecewise.py).
On the CPU they compile with ``CPU_PIECES_OPTIONS`` (no channels-last layouts; see there),
on CUDA with ``CUDA_PIECES_OPTIONS`` (no persistent reductions, which Triton failed to
compile in the solve piece); ``compile_options`` replaces those with inductor options of
one's own. By default (``SOLVE_PIECE``) the whole linear solve is a piece of its own
instead of the product: the support gradient is linearised once per task rather than
recomputed at every solver step (~8% less time per step on the CPU, ~170 s to compile;
on an H200 15.2–15.3 against 15.6 ms); ``solve_piece`` chooses either way. On the CPU a
convolutional network's query gradient runs task by task for tasks of at least
``QUERY_PER_TASK`` query examples (``query_per_task``: an integer, None for never,
"auto" for that default).
On CUDA either compiled step is what the graph captures; compiled pieces in the graph
measured 15.2–17.6 ms per omniglot-5w1s meta-step on an H200, against 32 ms for the eager
graph (benchmarks/gpu_step.py).

``auto_compile`` is what ``--compile auto`` (training's default) picks: the pieces for
schedules long enough to repay their compilation, nothing otherwise. With
``fallback=True`` (what ``auto`` uses) a compilation that fails (no Triton, no C++
compiler), or a graph capture of the compiled step that fails, is a warning and the step
runs uncompiled, in the graph where it applies (``compile_error`` keeps the reason); a
default solve piece that fails first falls back to the compiled product pieces, and only
if those fail too to the uncompiled step. A mode asked for explicitly fails loudly instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .algorithms.base import MetaAlgorithm, TaskBatch
from .algorithms.imaml import piecewise_unsupported
from .params import Params

if TYPE_CHECKING:
    from .config import Config

MODES = ("auto", "on", "off")
COMPILE = ("off", "step", "pieces")  # torch.compile: not at all, the whole step, its pieces
# --compile auto compiles the pieces for a schedule of at least this many meta-steps, per
# device type (2026-11-27, omniglot-5w1s): on an H200 they cut the step from 32 to
# 15.7-17.6 ms and compile in 43-84 s, repaid after ~3,000-6,000 steps; on 2 CPU cores
# training steps took 0.92 instead of 1.16 s after a 65 s compile, repaid after ~270 steps
# (docs/results/train_pieces_vs_eager_cpu.json); with the solve piece (below) 0.91
# against 1.29 s eager on another day, after ~170 s of compilation: repaid after ~450 steps
# (train_solve_vs_eager_cpu.json)
AUTO_COMPILE_MIN_STEPS = {"cuda": 5000, "cpu": 1000}
# inductor options for compile="pieces" on the CPU. There inductor lays every convolution
# out channels-last (oneDNN), and the batch normalisations between them then reduce down
# columns 2,048 floats apart (vmap's tasks × channels): the query pass's backward alone took
# ~100 ms. Plain NCHW took 4-9% less time per step at the peer setting and 8-16% less at
# the preset's (docs/results/cpu_pieces_layout{,_q1}.json and ad hoc pairs). On an AMD
# EPYC (Zen 3, AVX2) channels-last took 1.15x the time, round by round in one process
# (docs/results/cpu_variants_amd_epyc_interleaved.json).
CPU_PIECES_OPTIONS = {"layout_optimization": False}
# inductor options for compile="pieces" on CUDA: no persistent reductions. With them Triton
# (3.6, PyTorch 2.11) failed to compile the solve piece's fused MINRES update, a persistent
# reduction ("PassManager::run failed" in make_ttgir); with them off it compiles, and
# turning off inductor's mix-order reductions instead did not help (H200, 2026-11-27,
# docs/results/gpu/race1_*_h200)
CUDA_PIECES_OPTIONS = {"triton.persistent_reductions": False}
# compile="pieces" on the CPU compiles the linear solve as one piece (IMAML.pieces'
# solve_piece): the support gradient linearised once per task instead of recomputed at
# each solver step. Interleaved in one process (2026-11-27, 2 cores, freed memory kept):
# 0.786 against 0.859 s per step at omniglot-5w1s, 1.105 against 1.193 s at the peer
# setting, for 170 instead of 52-62 s of compilation (docs/results/cpu_pieces_solve*).
# On CUDA too, with CUDA_PIECES_OPTIONS (Triton failed to compile the piece with inductor's
# defaults): on an H200 the omniglot-5w1s meta-step took 15.2 and 15.3 ms against 15.6 ms
# with one compiled product per solver step (two processes, 2026-11-27), and training
# 15.1 ms per step against 15.9 (docs/results/gpu/race{1,2}_*_h200*, run_h200_solve_*).
SOLVE_PIECE = {"cpu": True, "cuda": True}
# on the solve path, the query gradient of a convolutional network runs task by task (a
# one-task compiled program called per task, IMAML.pieces' query_per_task) from this many
# query examples per task on, per device type. Under vmap each convolution is one grouped
# convolution over the tasks, which oneDNN runs slower than a dense one per task once a
# task has enough images (2 CPU cores, omniglot network, 32 tasks, compiled, 2026-11-27,
# docs/results/query_per_task.json: 214-251 against 307-314 ms at 75 query images per
# task, 156-168 against 209-212 ms at 50, 72-75 against 81-84 ms at 20, equal at 15,
# slower below). The per-task program is slower in some processes than in others: in ad
# hoc runs 3 of 10 processes at 25-30 images ran it 11-29% slower than vmap, and from 40
# on none by more than 3%, hence 40. On an AMD EPYC (Zen 3, AVX2) the whole peer step
# was within 0-5% either way in two interleaved races (cpu_variants_amd_epyc_interleaved.json
# and the README), so 40 stays. Not on CUDA (not measured there; per-task launches
# are what the graph exists to avoid).
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


def _one_line(e: Exception) -> str:
    """``Type: first line of the message`` (inductor's errors run to pages)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


_WARMUP_STREAMS: dict[int, torch.cuda.Stream] = {}


def _warmup_stream() -> torch.cuda.Stream:
    """One side stream per device for every capture's warm-up: cuBLAS keeps a workspace per
    stream, so a new stream per capture would leave one more workspace allocated each time."""
    device = torch.cuda.current_device()
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream()
    return _WARMUP_STREAMS[device]


def _signature(params: Params, batch: TaskBatch) -> tuple:
    t = [(k, tuple(v.shape), v.dtype, v.device) for k, v in params.items()]
    return tuple(t) + tuple((tuple(x.shape), x.dtype, x.device) for x in batch)


class _Captured:
    """One captured graph: static inputs, the graph, and its static outputs."""

    def __init__(self, step, params: Params, batch: TaskBatch, warmup: int):
        self.params = {k: v.detach().clone() for k, v in params.items()}
        self.batch = TaskBatch(*(x.clone() for x in batch))
        side = _warmup_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # cuDNN/cuBLAS set-up and autotuning stay out of the graph
            for _ in range(warmup):
                step(self.params, self.batch)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = step(self.params, self.batch)

    def __call__(self, params: Params, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        with torch.no_grad():
            for k, v in params.items():
                self.params[k].copy_(v)
            for static, x in zip(self.batch, batch, strict=True):
                static.copy_(x, non_blocking=True)
        self.graph.replay()
        mean, stats = self.out
        # the static outputs are overwritten by the next replay: hand out copies
        return {k: v.clone() for k, v in mean.items()}, {k: v.clone() for k, v in stats.items()}


class MetaStep:
    """``alg.meta_grad`` with the CUDA-graph and ``torch.compile`` fast paths (see the
    module docstring)."""

    def __init__(
        self,
        alg: MetaAlgorithm,
        *,
        mode: str = "auto",
        compile: bool | str = False,
        warmup: int = 3,
        max_graphs: int = 4,
        fallback: bool = False,
        compile_options: dict | None = None,
        solve_piece: bool | None = None,
        query_per_task: int | None | str = "auto",
    ):
        if mode not in MODES:
            raise ValueError(f"cuda_graph must be one of {MODES}, got {mode!r}")
        if mode == "on" and not alg.batched:
            raise ValueError("cuda_graph on needs the batched (vmap) path")
        self.compile = {False: "off", True: "step"}.get(compile, compile)
        if self.compile not in COMPILE:
            raise ValueError(f"compile must be True, False or one of {COMPILE}, got {compile!r}")
        if self.compile != "off" and not alg.batched:
            raise ValueError("compile needs the batched (vmap) path")
        if solve_piece is not None and (
            self.compile != "pieces" or not isinstance(solve_piece, bool)
        ):
            raise ValueError(
                f"solve_piece (True/False) applies to compile='pieces', got {solve_piece!r} "
                f"with compile={compile!r}"
            )
        self.alg = alg
        kind = next(alg.model.parameters()).device.type
        if compile_options is None:  # ours for the pieces: {CPU,CUDA}_PIECES_OPTIONS
            ours = {"cpu": CPU_PIECES_OPTIONS, "cuda": CUDA_PIECES_OPTIONS}
            compile_options = ours.get(kind, {}) if self.compile == "pieces" else {}
        # the solver as one piece: the default for the pieces per device type (SOLVE_PIECE);
        # a default one that fails to compile falls back to the product piece (fallback)
        self._solve_piece_chosen = solve_piece is not None or query_per_task not in ("auto", None)
        if solve_piece is None:
            solve_piece = self.compile == "pieces" and SOLVE_PIECE.get(kind, False)
        self.solve_piece = solve_piece
        # the query gradient task by task from this many query examples per task on
        if query_per_task not in ("auto", None) and self.compile != "pieces":
            raise ValueError(
                f"query_per_task applies to compile='pieces', got {query_per_task!r} "
                f"with compile={compile!r}"
            )
        if query_per_task == "auto":
            convolutional = any(isinstance(m, torch.nn.Conv2d) for m in alg.model.modules())
            least = QUERY_PER_TASK.get(kind) if convolutional else None
            query_per_task = least if self.solve_piece else None
        self.query_per_task = query_per_task
        self.compile_options = dict(compile_options)
        # static shapes: one specialised program per batch shape, as the graphs
        options = self.compile_options or None
        self._wrap = lambda f: torch.compile(f, dynamic=False, options=options)
        if self.compile == "pieces":
            if (why := piecewise_unsupported(alg, algo=alg.name)) is not None:
                raise ValueError(f"compile='pieces' does not support {why}; use compile='step'")
            self.step = self._piecewise_step()
        elif self.compile == "step":
            self.step = self._wrap(alg.meta_grad_tensors)
        else:
            self.step = alg.meta_grad_tensors
        self.mode = mode
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, _Captured] = {}
        self.fallback_reason: str | None = None
        self.replays = 0
        self.compile_fallback = fallback  # a failed compilation: warn, run uncompiled
        self.compile_error: str | None = None

    def _piecewise_step(self) -> Callable:
        alg = self.alg
        pieces = alg.pieces(
            self._wrap, solve_piece=self.solve_piece, query_per_task=self.query_per_task
        )
        return lambda params, batch: alg.meta_grad_piecewise(params, batch, pieces)

    def _compile_failed(self, e: Exception, *, in_capture: bool = False) -> bool:
        """Whether ``e`` is a failure of the compiled step that ``fallback`` absorbs (a failed
        compilation; in a CUDA-graph capture, any failure: the uncompiled graph is faster
        than compiled pieces run eager). If so, compiled pieces whose solve piece was the
        default (``SOLVE_PIECE``) fall back to one compiled product per solver step (Triton
        failed on the solve piece alone before, fourth loan), and otherwise the step runs
        uncompiled from now on."""
        dynamo = isinstance(e, torch._dynamo.exc.TorchDynamoException)
        if not (self.compile_fallback and self.compile != "off" and (dynamo or in_capture)):
            return False
        self.compile_error = _one_line(e)
        what = "torch.compile" if dynamo else "CUDA graph capture of the torch.compile"
        if self.compile == "pieces" and self.solve_piece and not self._solve_piece_chosen:
            warnings.warn(
                f"{what} (pieces) of the meta-step failed with the solve piece "
                f"({self.compile_error}); compiling one Hessian-vector product per solver "
                "step instead",
                RuntimeWarning,
                stacklevel=3,
            )
            self.solve_piece, self.query_per_task = False, None
            self.step = self._piecewise_step()
            return True
        warnings.warn(
            f"{what} ({self.compile}) of the meta-step failed ({self.compile_error}); "
            "running it uncompiled (--compile off skips the attempt)",
            RuntimeWarning,
            stacklevel=3,
        )
        self.compile, self.step = "off", self.alg.meta_grad_tensors
        return True

    def applies(self, params: Params, batch: TaskBatch) -> bool:
        if self.mode == "off" or not self.alg.batched or self.fallback_reason is not None:
            return False
        on_cuda = all(v.is_cuda for v in params.values()) and all(x.is_cuda for x in batch)
        if not on_cuda and self.mode == "on":
            raise ValueError("cuda_graph on needs the parameters and tasks on a CUDA device")
        return on_cuda and batch.num_tasks > 0

    def __call__(
        self, params: Params, batch: TaskBatch, *, allow_empty: bool = False
    ) -> tuple[Params, dict[str, Tensor]]:
        if not isinstance(batch, TaskBatch):
            batch = TaskBatch(*batch)
        out = self._graph(params, batch) if self.applies(params, batch) else None
        mean, stats = out if out is not None else self._step(params, batch)
        if not allow_empty:
            self.alg.check_not_all_skipped(stats)
        return mean, stats

    def _graph(self, params: Params, batch: TaskBatch):
        """The replayed graph's outputs, or None where capture failed (``mode="auto"``)."""
        key = _signature(params, batch)
        captured = self.graphs.get(key)
        if captured is None:
            if len(self.graphs) >= self.max_graphs:
                self.graphs.pop(next(iter(self.graphs)))
            try:
                captured = _Captured(self.step, params, batch, self.warmup)
            except Exception as e:  # an op that cannot be captured: eager from now on
                if self._compile_failed(e, in_capture=True):  # capture again, uncompiled
                    return self._graph(params, batch)
                if self.mode == "on":
                    raise ValueError(f"CUDA graph capture of the meta-step failed: {e}") from e
                self.fallback_reason = f"{type(e).__name__}: {e}"
                torch.cuda.synchronize()
                return None
            self.graphs[key] = captured
        out = captured(params, batch)
        self.replays += 1
        return out

    def _step(self, params: Params, batch: TaskBatch):
        """The step without a graph (compiled when ``compile``)."""
        while True:  # each absorbed failure falls back one step: solve piece, product, off
            try:
                return self.step(params, batch)
            except torch._dynamo.exc.TorchDynamoException as e:  # no C++ compiler / Triton
                if not self._compile_failed(e):
                    raise ValueError(  # the CLI reports it in one line (exit 2)
                        f"torch.compile of the meta-step failed ({_one_line(e)}); "
                        "run without --compile"
                    ) from e
