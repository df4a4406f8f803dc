"""What every meta-learning algorithm shares: the task batch, the losses, the batching.

An algorithm is a class with keyword-only hyperparameters and one method written for a
single task, ``task_meta_grad(theta, sx, sy, qx, qy) -> (g, stats)``. ``meta_grad``
runs it for every task of a ``TaskBatch`` at once with ``torch.func.vmap`` (or, with
``batched=False``, in a per-task Python loop, the reference path) and averages.

On the batched path the network's tensors can travel as one flat vector (``flat``):
the inner loop's and the linear solver's element-wise arithmetic on a parameter dict
then costs one kernel per operation instead of one per tensor, and the losses see the
original shapes through views (``split`` + ``view``). The math is unchanged; only the
summation order of norms and dot products differs (tested equal to the per-tensor path
in float64). Measured (benchmarks/gpu_step.py): 33.7 vs 38.6 ms per CUDA-graph meta-step
on an H100, but 1.45 vs 1.28 s on 2 CPU cores, where launches are cheap and the split's
backward costs more; so ``flat=None`` (default) flattens on CUDA only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ..autodiff import SplitLoss
from ..checks import check_int, check_number
from ..inner import VARIANTS, MiniBatched, adapt, batch_order, check_mini_batch, proximal_objective
from ..inner_optim import get_inner_solver
from ..params import Params, norm, ravel
from .checks import (
    batch_statistics,
    check_batch,
    check_params,
    constant_names,
    loss_function,
    tracking_batchnorms,
)

FLAT = "_flat"  # key of the flattened network parameters on the fast path


@functools.cache
def _order_tensor(n: int, batch: int, steps: int, device: torch.device) -> Tensor:
    """``batch_order`` as a (steps, batch) index tensor on ``device``, made once (so a
    CUDA graph captures no host-to-device copy)."""
    return torch.tensor(batch_order(n, batch, steps), device=device)


class TaskBatch(NamedTuple):
    """Support and query sets of T tasks, each tensor with a leading task dimension T."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def to(self, *args, **kwargs) -> TaskBatch:
        return TaskBatch(*(t.to(*args, **kwargs) for t in self))

    def task(self, i: int) -> TaskBatch:
        """Task i, without the task dimension."""
        return TaskBatch(*(t[i] for t in self))


class MetaAlgorithm:
    """Base class. Subclasses set ``name`` and implement ``task_meta_grad``.

    Not thread-safe: ``torch.func.functional_call`` swaps parameters into ``model``, so
    threads need algorithms built on their own copies of the network."""

    name = "base"

    def __init__(
        self,
        *,
        model: nn.Module,
        loss: str = "cross_entropy",
        lam: float = 0.0,
        inner_steps: int = 16,
        inner_lr: float = 0.1,
        inner_solver: str | Callable = "gd",
        variant: str = "paper",
        inner_tol: float = 0.0,
        inner_options: dict | None = None,
        inner_batch: int | None = None,
        batched: bool = True,
        flat: bool | None = None,
        task_chunk: int | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._loss_fn = loss_function(loss)
        check_number("lam", lam, positive=False)
        check_int("inner_steps", inner_steps)
        check_number("inner_lr", inner_lr, positive=True)
        get_inner_solver(inner_solver)
        check_number("inner_tol", inner_tol, positive=False)
        if inner_options is not None and not isinstance(inner_options, dict):
            raise ValueError(f"inner_options must be a dict, got {type(inner_options).__name__}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown inner-loop variant {variant!r}; choose one of {VARIANTS}")
        if task_chunk is not None:
            check_int("task_chunk", task_chunk, minimum=1)
        if inner_batch is not None:
            check_int("inner_batch", inner_batch, minimum=1)
            check_mini_batch(inner_solver, inner_tol)
        self.model = model
        self.loss = loss
        self.lam = float(lam)
        self.inner_steps = inner_steps
        self.inner_lr = float(inner_lr)
        self.inner_solver = inner_solver
        self.variant = variant
        self.inner_tol = float(inner_tol)
        self.inner_options = dict(inner_options or {})
        self.inner_batch = inner_batch
        self.batched = bool(batched)
        if flat not in (None, True, False):
            raise ValueError(f"flat must be True, False or None (CUDA only), got {flat!r}")
        self.flat = flat
        self.task_chunk = task_chunk
        self._tracking_bn = tracking_batchnorms(model)  # used with batch statistics
        self._constants: Params = {}  # frozen parameters and buffers, set by ``trainable``
        self._unravel = None  # inverse of the last ``pack`` (flat vector → named tensors)
        self._packed_layout = None  # the names and shapes ``_unravel`` was made for

    # -- losses as functions of a parameter dict ------------------------------------
    def outputs(self, params: Params, x: Tensor) -> Tensor:
        """The network's outputs on ``x`` with ``params`` (and the constants of the last
        ``trainable`` call: frozen parameters, buffers). BatchNorm layers that keep running
        statistics use the batch's own here, and their running statistics stay untouched."""
        p = {**self._constants, **self.unpack(params)} if self._constants else self.unpack(params)
        if not self._tracking_bn:
            return functional_call(self.model, p, (x,))
        with batch_statistics(self._tracking_bn):
            return functional_call(self.model, p, (x,))

    def loss_and_metric(self, params: Params, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        return self._loss_fn(self.outputs(params, x), y)

    def trainable(self, params: Params) -> Params:
        """The entries of ``params`` that are adapted and meta-trained, detached. The rest,
        the model's frozen parameters (``requires_grad=False``), its buffers and any
        non-floating tensor, are held as constants for the losses: never adapted, and no
        meta-gradient is returned for them."""
        const = constant_names(self.model)
        keep = lambda k, v: k not in const and v.is_floating_point()
        self._constants = {k: v.detach() for k, v in params.items() if not keep(k, v)}
        return {k: v.detach() for k, v in params.items() if keep(k, v)}

    def check_inputs(self, params: Params, batch) -> None:
        """One-line ValueErrors for params that do not match the model, and for a batch
        whose fields disagree, lack the task dimension or the parameters' dtype."""
        check_params(self.model, params, extra=lambda k: not self.is_network_key(k))
        check_batch(self.model, batch, params)

    # -- the flat layout of the fast path ---------------------------------------------
    def is_network_key(self, key: str) -> bool:
        """False for meta-parameters that are not the network's (learned log λ)."""
        return True

    def pack(self, theta: Params) -> Params:
        """θ as the hot loop sees it: with ``flat`` (None: on CUDA), the network's tensors
        as one vector under the key ``FLAT`` (other entries, e.g. a learned log λ, unchanged)."""
        if FLAT in theta or self.flat is False:
            return theta
        if self.flat is None and not all(v.is_cuda for v in theta.values()):
            return theta
        network = {k: v for k, v in theta.items() if self.is_network_key(k)}
        flat, unravel = ravel(network)
        layout = tuple((k, v.shape) for k, v in network.items())
        if layout != self._packed_layout:  # the same inverse while the layout stays, so
            self._unravel, self._packed_layout = unravel, layout  # compiled code keeps it
        return {FLAT: flat, **{k: v for k, v in theta.items() if k not in network}}

    def unpack(self, packed: Params) -> Params:
        """Inverse of ``pack``: the network's tensors by name, as views into the flat vector;
        leading (task) dimensions are kept."""
        if FLAT not in packed:
            return packed
        rest = {k: v for k, v in packed.items() if k != FLAT}
        return {**self._unravel(packed[FLAT]), **rest}

    def loss_of(self, x: Tensor, y: Tensor) -> SplitLoss:
        """p ↦ L(p) on the data (x, y), as the network's outputs and the loss on them (what
        the Gauss–Newton curvature needs; called, the same as ``loss_and_metric``'s loss)."""
        return SplitLoss(lambda p: self.outputs(p, x), lambda z: self._loss_fn(z, y)[0])

    @property
    def classification(self) -> bool:
        return self.loss == "cross_entropy"

    # -- meta-parameters beyond the network's (learned λ) ---------------------------
    def meta_parameters(self, model_params: Params) -> Params:
        """The dict of everything the outer optimiser updates; the network's parameters here."""
        return model_params

    def split_meta(self, theta: Params) -> tuple[Params, object]:
        """(network parameters, λ to use): a fixed λ here; learned λ in iMAML."""
        return theta, self.lam

    # -- the shared inner loop ------------------------------------------------------
    def inner_settings(self, **overrides) -> dict:
        hp = {
            "inner_steps": self.inner_steps,
            "inner_lr": self.inner_lr,
            "solver": self.inner_solver,
            "variant": self.variant,
            "tol": self.inner_tol,
            "options": self.inner_options,
            "inner_batch": self.inner_batch,
        }
        hp.update(overrides)
        return hp

    def adapt_with_info(self, theta: Params, sx: Tensor, sy: Tensor, **overrides):
        """(φ, info) from the shared inner loop with this algorithm's settings or ``overrides``."""
        model_params, lam = self.split_meta(theta)
        hp = self.inner_settings(**overrides)
        hp.setdefault("lam", lam)
        loss = self.support_loss(sx, sy, batch=hp.pop("inner_batch"), steps=hp["inner_steps"])
        return adapt(loss, model_params, return_info=True, **hp)

    def support_loss(self, sx: Tensor, sy: Tensor, *, batch: int | None, steps: int):
        """L̂ on the support set; with ``batch`` smaller than it, also each inner step's
        mini-batch of ``batch`` examples (``imaml.inner.batch_order``)."""
        full = self.loss_of(sx, sy)
        n = sx.shape[0]
        if batch is None or batch >= n or steps == 0:
            return full
        order = _order_tensor(n, batch, steps, sx.device)
        return MiniBatched(full, tuple(self.loss_of(sx[i], sy[i]) for i in order))

    def adapt(self, theta: Params, sx: Tensor, sy: Tensor, **overrides) -> Params:
        """φ from the shared inner loop (training and evaluation alike)."""
        return self.adapt_with_info(theta, sx, sy, **overrides)[0]

    def inner_grad_norm(self, theta: Params, phi: Params, sx: Tensor, sy: Tensor) -> Tensor:
        """‖∇G(φ)‖ with G(φ) = L̂(φ) + (λ/2)‖φ − θ‖²: how far the inner problem is from solved."""
        model_params, lam = self.split_meta(theta)
        G = proximal_objective(self.loss_of(sx, sy), model_params, lam=lam)
        return norm(grad(G)(phi))

    def inner_stats(self, theta: Params, phi: Params, sx, sy, info: dict) -> dict[str, Tensor]:
        """How far the inner loop got: ‖∇G(φ)‖ on the whole support set, and its iterations.
        With ``inner_batch`` the norm is left out: its full-support gradient would cost
        more than the mini-batched steps themselves (docs/reproduction.md)."""
        stats = {}
        if self.inner_batch is None:
            stats["inner_grad_norm"] = self.inner_grad_norm(theta, phi, sx, sy)
        stats["inner_iterations"] = info["iterations"]
        return stats

    def query_stats(self, phi: Params, sx, sy, qx, qy) -> dict[str, Tensor]:
        q_loss, q_metric = self.loss_and_metric(phi, qx, qy)
        stats = {"support_loss": self.loss_of(sx, sy)(phi), "query_loss": q_loss}
        if q_metric is not None:
            stats["query_accuracy"] = q_metric
        return stats

    # -- per task and batched --------------------------------------------------------
    def task_meta_grad(self, theta: Params, sx, sy, qx, qy) -> tuple[Params, dict[str, Tensor]]:
        raise NotImplementedError

    def meta_grad(
        self, params: Params, batch: TaskBatch, *, allow_empty: bool = False
    ) -> tuple[Params, dict[str, Tensor]]:
        """Mean meta-gradient over the tasks of ``batch`` and per-task statistics (shape (T,)).

        Tasks with a non-finite loss or meta-gradient are left out of the mean and flagged
        in ``stats["skipped"]``; ValueError if no task is left (unless ``allow_empty``, used
        by data-parallel training where other ranks may still hold kept tasks).
        """
        if not isinstance(batch, TaskBatch):
            if not isinstance(batch, tuple | list) or len(batch) != 4:
                raise ValueError(
                    "batch must be a TaskBatch(support_x, support_y, query_x, query_y)"
                )
            batch = TaskBatch(*batch)
        self.check_inputs(params, batch)
        mean, stats = self.meta_grad_tensors(params, batch)
        if not allow_empty:
            self.check_not_all_skipped(stats)
        return mean, stats

    def check_not_all_skipped(self, stats: dict[str, Tensor]) -> None:
        if bool(stats["skipped"].all()):
            raise ValueError(
                f"{self.name}: every task of the batch gave a non-finite loss or meta-gradient; "
                "lower inner_lr or check the inputs"
            )

    def meta_grad_tensors(
        self, params: Params, batch: TaskBatch
    ) -> tuple[Params, dict[str, Tensor]]:
        """``meta_grad`` without its check: tensors in, tensors out, no host-device
        synchronisation on the batched path, so it can be captured as a CUDA graph
        (``imaml.fast``)."""
        theta = self.trainable(params)
        if self.batched:
            packed = self.pack(theta)
            run = vmap(
                self.task_meta_grad,
                in_dims=(None, 0, 0, 0, 0),
                chunk_size=self.task_chunk,
                randomness="different",  # dropout: a mask of its own per task
            )
            g, stats = run(packed, *batch)
        else:
            outs = [self.task_meta_grad(theta, *batch.task(i)) for i in range(batch.num_tasks)]
            g = {k: torch.stack([o[0][k] for o in outs]) for k in theta}
            stats = {k: torch.stack([o[1][k] for o in outs]) for k in outs[0][1]}
        return self.mean_over_tasks(g, stats)

    def mean_over_tasks(
        self, g: Params, stats: dict[str, Tensor]
    ) -> tuple[Params, dict[str, Tensor]]:
        """The mean of the per-task meta-gradients ``g`` (leading dimension T) over the
        tasks kept, the network's tensors by name; adds ``stats["skipped"]``.

        A task whose losses or meta-gradient are not finite (an exploding inner loop, a
        NaN input) is dropped from the mean and counted in ``stats["skipped"]``."""
        bad = ~torch.isfinite(stats["query_loss"]) | ~torch.isfinite(stats["support_loss"])
        if "solver_diverged" in stats:  # a linear solve that ran away (Neumann)
            bad = bad | stats["solver_diverged"]
        for v in g.values():
            bad |= ~torch.isfinite(v.reshape(v.shape[0], -1)).all(1)
        stats["skipped"] = bad
        keep = (~bad).to(next(iter(g.values())).dtype)
        n = keep.sum().clamp(min=1)  # all skipped (allow_empty): a zero gradient of weight 0
        mean = {}
        for k, v in g.items():
            w = keep.view(-1, *([1] * (v.dim() - 1)))
            mean[k] = torch.where(w > 0, v, torch.zeros_like(v)).sum(0) / n
        return self.unpack(mean), stats

    def hyperparameters(self) -> dict:
        return {
            "lam": self.lam,
            "inner_steps": self.inner_steps,
            "inner_lr": self.inner_lr,
            "inner_solver": self.inner_solver if isinstance(self.inner_solver, str) else "custom",
            "variant": self.variant,
            "inner_tol": self.inner_tol,
            "inner_options": self.inner_options,
            "inner_batch": self.inner_batch,
            "loss": self.loss if isinstance(self.loss, str) else "custom",
            "batched": self.batched,
            "flat": self.flat,
            "task_chunk": self.task_chunk,
        }
