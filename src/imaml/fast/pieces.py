"""iMAML's meta-gradient with the inner loop and the linear solver outside vmap.

The same math as ``IMAML.meta_grad_tensors`` (tested equal in float64,
tests/test_piecewise.py), cut into a few batched pieces (one inner step, the query
gradient, the linear solve or one product with I + H/λ) so that ``torch.compile``
compiles each once and the loops reuse them (``imaml.fast.MetaStep``, compile="pieces").
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from ..algorithms.base import TaskBatch
from ..autodiff import linearize_curvature
from ..implicit import implicit_operator
from ..inner import inner_objective, pull_back
from ..inner_optim import gd
from ..linalg import solve
from ..params import Params, ravel


def piecewise_unsupported(settings, *, algo: str) -> str | None:
    """Why ``imaml.fast.meta_grad_piecewise`` does not apply to algorithm ``algo`` with
    ``settings`` (an algorithm or a run's ``Config``: anything with ``batched``,
    ``inner_solver``, ``inner_tol``, ``learn_lam``, ``inner_batch`` and ``solver``), or None
    if it does. It is iMAML's; its inner loop repeats one plain gradient step (no solver
    state, no early stop), and its solver runs on T systems at once (not the dense
    ``exact`` solve)."""
    if algo != "imaml":
        return f"{algo} (iMAML only)"
    if not settings.batched:
        return "the per-task loop (batched=False)"
    if settings.inner_solver != "gd" or settings.inner_tol > 0:
        return (
            f"inner_solver={settings.inner_solver!r} with inner_tol={settings.inner_tol} "
            "(needs gd, 0)"
        )
    if settings.learn_lam != "none":
        return f"learn_lam={settings.learn_lam!r}"
    if settings.inner_batch is not None:
        return "inner_batch (mini-batched inner steps)"
    if settings.solver == "exact":
        return "solver='exact'"
    return None


class Pieces(NamedTuple):
    """The batched functions of ``imaml.fast.meta_grad_piecewise`` (see there). The product
    path (``make_pieces(solve_piece=False)``) has ``linearize`` and ``matvec``; the solve path
    (``solve_piece=True``) has ``query`` and ``solve``; the other two are None."""

    inner_step: Callable
    linearize: Callable | None = None
    matvec: Callable | None = None
    query: Callable | None = None
    solve: Callable | None = None


def make_pieces(
    alg,
    wrap: Callable[[Callable], Callable] = lambda f: f,
    *,
    solve_piece: bool = False,
    query_per_task: int | None = None,
) -> Pieces:
    """The batched functions ``meta_grad_piecewise`` calls, each ``wrap``ped once
    (``torch.compile`` in ``imaml.fast.MetaStep``).

    Without ``solve_piece`` (the product path): ``inner_step``, ``linearize`` (the query
    gradient v = ∇L(φ) and the support set's statistics) and ``matvec``, one product
    with I + H/λ, which the solver calls once per step; each product recomputes the
    gradient at φ (a compiled piece cannot keep the linearisation between calls;
    linearising by ``torch.autograd`` outside vmap instead gets batch normalisation's
    second derivatives wrong in PyTorch 2.13, tests/test_autodiff.py).

    With ``solve_piece=True`` (the solve path): ``inner_step``, ``query`` (v and the
    query statistics) and ``solve``, the whole linear solve as one piece: the support
    gradient is linearised once per task, its forward pass also gives the support
    statistics, and the solver's steps reuse it, as on the vmap path (a bigger program
    to compile, and no forward and backward pass repeated per solver step).
    ``query_per_task`` (solve path only): from that many query examples per task on,
    ``query`` runs a one-task program task by task instead of under vmap, where vmap's
    grouped convolutions are slower than dense ones (the peer setting's 75 query
    images per task on 2 CPU cores; see ``imaml.fast.QUERY_PER_TASK``). One
    Python call per task, once per meta-step, outside the inner and solver loops.

    Each piece is its own function calling ``vmap`` inside, not ``vmap``'s wrapper
    itself: dynamo keeps at most 8 compiled entries per code object, and the pieces
    of every algorithm in a process would otherwise share vmap's one wrapper code (a
    third compiled algorithm fell back to eager). Now the limit is 8 algorithms per
    process, as for the whole compiled step; each batch shape is an entry of its own
    (``task_chunk`` with a smaller last chunk: two per algorithm)."""
    task = (None, 0, 0)  # θ shared, φ and the support set per task

    def inner_step(theta, phi, sx, sy):
        return vmap(partial(_piece_inner_step, alg), in_dims=(*task, 0))(theta, phi, sx, sy)

    whole = isinstance(query_per_task, int) and not isinstance(query_per_task, bool)
    if query_per_task is not None and (not solve_piece or not whole or query_per_task < 1):
        raise ValueError(
            "query_per_task (an integer >= 1) applies to the solve path (solve_piece=True), "
            f"got {query_per_task!r} with solve_piece={solve_piece!r}"
        )
    if solve_piece:

        def query(phi, qx, qy):
            return vmap(partial(_piece_query, alg))(phi, qx, qy)

        def solve(theta, phi, sx, sy, v):
            return vmap(partial(_piece_solve, alg), in_dims=(*task, 0, 0))(theta, phi, sx, sy, v)

        query = wrap(query)
        if query_per_task is not None:
            query = _query_task_by_task(alg, wrap, query, query_per_task)
        return Pieces(inner_step=wrap(inner_step), query=query, solve=wrap(solve))

    def linearize(theta, phi, sx, sy, qx, qy):
        run = vmap(partial(_piece_linearize, alg), in_dims=(*task, 0, 0, 0))
        return run(theta, phi, sx, sy, qx, qy)

    def matvec(phi, sx, sy, u):
        return vmap(partial(_piece_matvec, alg))(phi, sx, sy, u)

    return Pieces(inner_step=wrap(inner_step), linearize=wrap(linearize), matvec=wrap(matvec))


def _query_task_by_task(alg, wrap, batched: Callable, least: int) -> Callable:
    """``batched`` (the vmapped query piece) for tasks of fewer than ``least`` query
    examples; from ``least`` on, the one-task query piece called task by task and its
    outputs stacked (the same values; equal in float64, tests/test_piecewise.py)."""

    def query_one(phi, qx, qy):
        return _piece_query(alg, phi, qx, qy)

    one = wrap(query_one)

    def query(phi, qx, qy):
        if qx.shape[1] < least:
            return batched(phi, qx, qy)
        outs = [one({k: t[i] for k, t in phi.items()}, qx[i], qy[i]) for i in range(len(qx))]
        stack = lambda dicts: {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}
        v, q_loss, q_metrics = zip(*outs, strict=True)
        return stack(v), torch.stack(q_loss), stack(q_metrics)

    return query


def _piece_inner_step(alg, theta, phi, sx, sy):
    """One step of the inner loop (gradient descent on G, or on L̂ for the
    ``reference_code`` variant), as in ``adapt``."""
    objective = inner_objective(alg.loss_of(sx, sy), theta, lam=alg.lam, variant=alg.variant)
    return gd(objective, phi, steps=1, lr=alg.inner_lr)[0]


def _piece_query(alg, phi, qx, qy):
    """v = ∇L(φ), the query loss and the query metrics at the inner solution."""
    return alg.query_gradient(phi, qx, qy)


def _support_stats(alg, theta, phi, support_grad, s_loss):
    return alg.support_stats(theta, phi, support_grad, s_loss, lam=alg.lam)


def _piece_linearize(alg, theta, phi, sx, sy, qx, qy):
    """v = ∇L(φ), ∇L̂(φ) and the task's statistics at the inner solution."""
    v, q_loss, q_metrics = _piece_query(alg, phi, qx, qy)
    support_grad, s_loss = grad_and_value(alg.loss_of(sx, sy))(phi)
    return v, q_loss, q_metrics, _support_stats(alg, theta, phi, support_grad, s_loss)


def _piece_matvec(alg, phi, sx, sy, u):
    """u ↦ (I + H/λ)u (with the damping of ``implicit_operator``), H = ∇²L̂(φ) (or the
    Gauss–Newton matrix with ``curvature="ggn"``)."""
    H = linearize_curvature(alg.loss_of(sx, sy), phi, curvature=alg.curvature, mode=alg.hvp_mode)[1]
    A = implicit_operator(H, lam=alg.lam, cg_damping=alg.cg_damping, lam_damping=alg.lam_damping)
    return A(u)


def _piece_solve(alg, theta, phi, sx, sy, v):
    """The task's g = (I + H/λ)⁻¹v (with the damping of ``implicit_operator``), the
    solver's diagnostics and the support statistics, H linearised once at φ."""
    g, info, support_grad, s_loss = alg.implicit_solve(alg.loss_of(sx, sy), v, phi, lam=alg.lam)
    return g, info, _support_stats(alg, theta, phi, support_grad, s_loss)


def meta_grad_piecewise(
    alg, params: Params, batch: TaskBatch, pieces: Pieces
) -> tuple[Params, dict[str, Tensor]]:
    """``IMAML.meta_grad_tensors`` with the inner loop and the linear solver outside vmap.

    The same math as the vmap path (equal in float64, tests/test_piecewise.py): the
    inner loop calls the batched ``pieces.inner_step`` ``inner_steps`` times, and the
    solver either runs on T systems at once (``imaml.linalg``'s row-wise mode) calling
    the batched ``pieces.matvec`` once per step, or is one piece itself
    (``pieces.solve``). Each piece is one small program, so ``torch.compile``
    compiles it once and the loops reuse it, instead of compiling the whole unrolled
    step (minutes). Through ``matvec`` the Hessian-vector product is recomputed from
    φ at each solver step (one forward and backward more per step than the vmap path's
    linearisation, which a compiled piece cannot keep between calls); ``solve``
    linearises once, like the vmap path, at a longer compilation.
    With ``task_chunk`` the tasks go through all of this ``task_chunk`` at a time (the
    last chunk may be smaller, as with the vmap path's chunks), which bounds memory and
    keeps a chunk's tensors in the CPU's caches across its inner steps and products;
    each chunk size is a shape of its own to ``torch.compile``.
    Applies where ``piecewise_unsupported()`` is None; no host-device synchronisation.
    """
    if (why := piecewise_unsupported(alg, algo=alg.name)) is not None:
        raise ValueError(f"the piecewise meta-step does not support {why}")
    theta = alg.pack(alg.trainable(params))
    T = batch.num_tasks
    size = alg.task_chunk or T
    parts = [
        _piecewise_tasks(alg, theta, TaskBatch(*(t[i : i + size] for t in batch)), pieces)
        for i in range(0, T, size)
    ]
    if len(parts) == 1:
        return alg.mean_over_tasks(*parts[0])
    join = lambda dicts: {k: torch.cat([d[k] for d in dicts]) for k in dicts[0]}
    return alg.mean_over_tasks(join([p[0] for p in parts]), join([p[1] for p in parts]))


def _piecewise_tasks(
    alg, theta: Params, batch: TaskBatch, pieces: Pieces
) -> tuple[Params, dict[str, Tensor]]:
    """``meta_grad_piecewise`` for the tasks of ``batch`` at once: each task's
    meta-gradient and statistics (leading dimension T), before the mean."""
    sx, sy, qx, qy = batch
    T = batch.num_tasks
    phi = {k: v.expand(T, *v.shape).clone() for k, v in theta.items()}  # φ₀ = θ
    for _ in range(alg.inner_steps):
        phi = pieces.inner_step(theta, phi, sx, sy)
    phi = pull_back(phi, theta, lam=alg.lam, inner_lr=alg.inner_lr, variant=alg.variant)
    if pieces.solve is not None:
        v, q_loss, q_metrics = pieces.query(phi, qx, qy)
        g, info, support = pieces.solve(theta, phi, sx, sy, v)
    else:
        v, q_loss, q_metrics, support = pieces.linearize(theta, phi, sx, sy, qx, qy)
        b, unravel = ravel(v, batch_dims=1)  # (T, n): one system per task

        def A(x):
            return ravel(pieces.matvec(phi, sx, sy, unravel(x)), batch_dims=1)[0]

        x, info = solve(A, b, method=alg.solver, steps=alg.cg_steps, tol=alg.cg_tol)
        g = unravel(x)
    stats = {
        **support,
        "query_loss": q_loss,
        "inner_iterations": torch.full((T,), alg.inner_steps, device=sx.device),
        **alg.solver_stats(info),
        **q_metrics,
    }  # the keys in task_meta_grad's order
    return g, stats
