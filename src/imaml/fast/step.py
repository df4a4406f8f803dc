"""``MetaStep``: ``alg.meta_grad`` with the fast paths, one CUDA graph (capture once,
replay every step) and ``torch.compile`` (the whole step, or iMAML's pieces), falling back
to the uncompiled or ungraphed step where one does not apply (see ``imaml.fast``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from ..algorithms.base import MetaAlgorithm, TaskBatch
from ..params import Params
from . import graph
from .pieces import make_pieces, meta_grad_piecewise, piecewise_unsupported
from .policy import (
    COMPILE,
    CPU_PIECES_OPTIONS,
    CUDA_PIECES_OPTIONS,
    MODES,
    QUERY_PER_TASK,
    SOLVE_PIECE,
    one_line,
)


class MetaStep:
    """``alg.meta_grad`` with the CUDA-graph and ``torch.compile`` fast paths (see
    ``imaml.fast``)."""

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
        self.graphs: dict[tuple, graph.Captured] = {}
        self.fallback_reason: str | None = None
        self.replays = 0
        self.compile_fallback = fallback  # a failed compilation: warn, run uncompiled
        self.compile_error: str | None = None

    def _piecewise_step(self) -> Callable:
        alg = self.alg
        made = make_pieces(
            alg, self._wrap, solve_piece=self.solve_piece, query_per_task=self.query_per_task
        )
        return lambda params, batch: meta_grad_piecewise(alg, params, batch, made)

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
        self.compile_error = one_line(e)
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
        key = graph.signature(params, batch)
        captured = self.graphs.get(key)
        if captured is None:
            if len(self.graphs) >= self.max_graphs:
                self.graphs.pop(next(iter(self.graphs)))
            try:
                captured = graph.Captured(self.step, params, batch, self.warmup)
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
                        f"torch.compile of the meta-step failed ({one_line(e)}); "
                        "run without --compile"
                    ) from e
