"""iMAML: the implicit meta-gradient g = (I + H/λ)⁻¹ ∇L(φ), H = ∇²L̂(φ), at the inner solution φ."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from ..autodiff import CURVATURES, HVP_MODES, linearize_curvature
from ..implicit import check_hyperparameters, implicit_operator, lam_gradient, solve_implicit
from ..inner import inner_objective, proximal_gradient, pull_back
from ..linalg import solve
from ..params import Params, norm, ravel
from ..solvers import gd
from .base import MetaAlgorithm, TaskBatch, _check_float

DEFAULT_SOLVER = "minres"  # sound on indefinite I + H/λ; see benchmarks/solver_accuracy.py
LEARN_LAM = ("none", "scalar", "per_tensor")
LOG_LAM = "log_lam"  # key of a learned scalar log λ; per tensor: "log_lam:<parameter name>"


def piecewise_unsupported(settings, *, algo: str) -> str | None:
    """Why ``IMAML.meta_grad_piecewise`` does not apply to algorithm ``algo`` with
    ``settings`` (an algorithm or a run's ``Config``: anything with ``batched``,
    ``inner_solver``, ``inner_tol``, ``learn_lam`` and ``solver``), or None
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
    if settings.solver == "exact":
        return "solver='exact'"
    return None


class Pieces(NamedTuple):
    """The batched functions of ``IMAML.meta_grad_piecewise`` (see there). The product
    path (``pieces(solve_piece=False)``) has ``linearize`` and ``matvec``; the solve path
    (``solve_piece=True``) has ``query`` and ``solve``; the other two are None."""

    inner_step: Callable
    linearize: Callable | None = None
    matvec: Callable | None = None
    query: Callable | None = None
    solve: Callable | None = None


class IMAML(MetaAlgorithm):
    """Implicit MAML (Algorithms 1 and 2 of the paper).

    The inner loop minimises L̂(φ) + (λ/2)‖φ − θ‖² (``adapt``, any inner solver); the
    meta-gradient is never backpropagated through it, so memory does not grow with
    ``inner_steps``. ``solver``/``cg_steps``/``cg_tol`` choose the linear solve of
    (I + H/λ)g = ∇L(φ); ``cg_damping``/``lam_damping`` give (1 + cg_damping)I +
    H/(λ + lam_damping) (the authors' release: 1.0 and 10.0). ``curvature="ggn"`` puts the
    generalised Gauss–Newton matrix G = JᵀH_ℓJ of the support loss in place of H: positive
    semi-definite for cross-entropy and squared error, so I + G/λ is positive definite.

    ``learn_lam="scalar"`` or ``"per_tensor"`` makes λ a meta-parameter, learned through
    log λ (``meta_parameters`` adds it, initialised at ``lam``) with the exact derivative
    dL/dλ_k = g_kᵀ∇L̂_k(φ)/λ_k² (``imaml.implicit.lam_gradient``).
    """

    name = "imaml"

    def __init__(
        self,
        *,
        model,
        loss="cross_entropy",
        lam: float = 2.0,
        inner_steps: int = 16,
        inner_lr: float = 0.1,
        inner_solver="gd",
        variant: str = "paper",
        inner_tol: float = 0.0,
        inner_options: dict | None = None,
        cg_steps: int = 5,
        cg_tol: float = 0.0,
        solver: str = DEFAULT_SOLVER,
        cg_damping: float = 0.0,
        lam_damping: float = 0.0,
        hvp_mode: str = "rev",
        curvature: str = "hessian",
        learn_lam: str = "none",
        batched: bool = True,
        flat: bool | None = None,
        task_chunk: int | None = None,
    ):
        super().__init__(
            model=model,
            loss=loss,
            lam=lam,
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            inner_solver=inner_solver,
            variant=variant,
            inner_tol=inner_tol,
            inner_options=inner_options,
            batched=batched,
            # one λ per tensor needs the tensors apart (Λ is keyed by parameter name)
            flat=False if learn_lam == "per_tensor" else flat,
            task_chunk=task_chunk,
        )
        check_hyperparameters(lam=lam, steps=cg_steps, solver=solver)
        _check_float("cg_tol", cg_tol, positive=False)
        _check_float("cg_damping", cg_damping, positive=False)
        _check_float("lam_damping", lam_damping, positive=False)
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"unknown hvp_mode {hvp_mode!r}; choose one of {HVP_MODES}")
        if curvature not in CURVATURES:
            raise ValueError(f"unknown curvature {curvature!r}; choose one of {CURVATURES}")
        if learn_lam not in LEARN_LAM:
            raise ValueError(f"unknown learn_lam {learn_lam!r}; choose one of {LEARN_LAM}")
        if learn_lam != "none" and (cg_damping or lam_damping):
            raise ValueError(
                "learn_lam needs the paper's operator: set cg_damping = lam_damping = 0"
            )
        self.cg_steps = cg_steps
        self.cg_tol = float(cg_tol)
        self.solver = solver
        self.cg_damping = float(cg_damping)
        self.lam_damping = float(lam_damping)
        self.hvp_mode = hvp_mode
        self.curvature = curvature
        self.learn_lam = learn_lam

    # -- λ as a meta-parameter ------------------------------------------------------
    def is_network_key(self, key: str) -> bool:
        return not key.startswith(LOG_LAM)

    def meta_parameters(self, model_params: Params) -> Params:
        if self.learn_lam == "none":
            return model_params
        ref = next(iter(model_params.values()))
        init = lambda: torch.full(
            (), math.log(self.lam), dtype=ref.dtype, device=ref.device, requires_grad=True
        )
        if self.learn_lam == "scalar":
            return {**model_params, LOG_LAM: init()}
        return {**model_params, **{f"{LOG_LAM}:{k}": init() for k in model_params}}

    def split_meta(self, theta: Params):
        if self.learn_lam == "none":
            return theta, self.lam
        model = {k: v for k, v in theta.items() if not k.startswith(LOG_LAM)}
        if self.learn_lam == "scalar":
            return model, torch.exp(theta[LOG_LAM])
        return model, {k: torch.exp(theta[f"{LOG_LAM}:{k}"]) for k in model}

    # -- the meta-gradient ----------------------------------------------------------
    def task_meta_grad(self, theta, sx, sy, qx, qy):
        model_theta, lam = self.split_meta(theta)
        support_loss = self.loss_of(sx, sy)
        phi, inner = self.adapt_with_info(theta, sx, sy)

        # v = ∇L(φ), the query gradient at the inner solution.
        def query(p):
            loss, metric = self.loss_and_metric(p, qx, qy)
            return loss, ({} if metric is None else {"query_accuracy": metric})

        v, (q_loss, q_metrics) = grad_and_value(query, has_aux=True)(phi)
        g, info, support_grad, s_loss = self._solve(support_loss, v, phi, lam=lam)
        grad_G = proximal_gradient(support_grad, phi, model_theta, lam=lam)
        stats = {
            "support_loss": s_loss,
            "query_loss": q_loss,
            "inner_grad_norm": norm(grad_G),
            "inner_iterations": inner["iterations"],
            "solver_residual": info["residual"],
            "solver_iterations": info["iterations"],
            "negative_curvature": info["negative_curvature"],
            "solver_diverged": info["diverged"],
            **q_metrics,
        }
        if self.learn_lam == "scalar":
            g[LOG_LAM] = lam_gradient(g, support_grad, lam)
            stats["lam"] = lam * torch.ones_like(q_loss)
        elif self.learn_lam == "per_tensor":
            glog = lam_gradient(g, support_grad, lam)
            g.update({f"{LOG_LAM}:{k}": glog[k] for k in glog})
            stats["lam"] = sum(lam.values()) / len(lam) * torch.ones_like(q_loss)
        return g, stats

    def _solve(self, support_loss, v, phi, *, lam):
        """``solve_implicit`` with this algorithm's solver settings (the vmap path's and
        the solve piece's one call): (g, solver diagnostics, ∇L̂(φ), L̂(φ))."""
        return solve_implicit(
            support_loss,
            v,
            phi,
            lam=lam,
            solver=self.solver,
            steps=self.cg_steps,
            tol=self.cg_tol,
            cg_damping=self.cg_damping,
            lam_damping=self.lam_damping,
            hvp_mode=self.hvp_mode,
            curvature=self.curvature,
            with_loss=True,
        )

    # -- the same meta-gradient with the loops outside vmap --------------------------
    def piecewise_unsupported(self) -> str | None:
        """Why ``meta_grad_piecewise`` does not apply to these settings (None if it does)."""
        return piecewise_unsupported(self, algo=self.name)

    def pieces(
        self,
        wrap: Callable[[Callable], Callable] = lambda f: f,
        *,
        solve_piece: bool = False,
        query_per_task: int | None = None,
    ) -> Pieces:
        """The batched functions ``meta_grad_piecewise`` calls, each ``wrap``ped once
        (``torch.compile`` in ``imaml.cuda_graph.MetaStep``).

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
        images per task on 2 CPU cores; see ``imaml.cuda_graph.QUERY_PER_TASK``). One
        Python call per task, once per meta-step, outside the inner and solver loops.

        Each piece is its own function calling ``vmap`` inside, not ``vmap``'s wrapper
        itself: dynamo keeps at most 8 compiled entries per code object, and the pieces
        of every algorithm in a process would otherwise share vmap's one wrapper code (a
        third compiled algorithm fell back to eager). Now the limit is 8 algorithms per
        process, as for the whole compiled step; each batch shape is an entry of its own
        (``task_chunk`` with a smaller last chunk: two per algorithm)."""
        task = (None, 0, 0)  # θ shared, φ and the support set per task

        def inner_step(theta, phi, sx, sy):
            return vmap(self._piece_inner_step, in_dims=(*task, 0))(theta, phi, sx, sy)

        whole = isinstance(query_per_task, int) and not isinstance(query_per_task, bool)
        if query_per_task is not None and (not solve_piece or not whole or query_per_task < 1):
            raise ValueError(
                "query_per_task (an integer >= 1) applies to the solve path (solve_piece=True), "
                f"got {query_per_task!r} with solve_piece={solve_piece!r}"
            )
        if solve_piece:

            def query(phi, qx, qy):
                return vmap(self._piece_query)(phi, qx, qy)

            def solve(theta, phi, sx, sy, v):
                return vmap(self._piece_solve, in_dims=(*task, 0, 0))(theta, phi, sx, sy, v)

            query = wrap(query)
            if query_per_task is not None:
                query = self._query_task_by_task(wrap, query, query_per_task)
            return Pieces(inner_step=wrap(inner_step), query=query, solve=wrap(solve))

        def linearize(theta, phi, sx, sy, qx, qy):
            run = vmap(self._piece_linearize, in_dims=(*task, 0, 0, 0))
            return run(theta, phi, sx, sy, qx, qy)

        def matvec(phi, sx, sy, u):
            return vmap(self._piece_matvec)(phi, sx, sy, u)

        return Pieces(inner_step=wrap(inner_step), linearize=wrap(linearize), matvec=wrap(matvec))

    def _query_task_by_task(self, wrap, batched: Callable, least: int) -> Callable:
        """``batched`` (the vmapped query piece) for tasks of fewer than ``least`` query
        examples; from ``least`` on, the one-task query piece called task by task and its
        outputs stacked (the same values; equal in float64, tests/test_piecewise.py)."""

        def query_one(phi, qx, qy):
            return self._piece_query(phi, qx, qy)

        one = wrap(query_one)

        def query(phi, qx, qy):
            if qx.shape[1] < least:
                return batched(phi, qx, qy)
            outs = [one({k: t[i] for k, t in phi.items()}, qx[i], qy[i]) for i in range(len(qx))]
            stack = lambda dicts: {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}
            v, q_loss, q_metrics = zip(*outs, strict=True)
            return stack(v), torch.stack(q_loss), stack(q_metrics)

        return query

    def _piece_inner_step(self, theta, phi, sx, sy):
        """One step of the inner loop (gradient descent on G, or on L̂ for the
        ``reference_code`` variant), as in ``adapt``."""
        objective = inner_objective(self.loss_of(sx, sy), theta, lam=self.lam, variant=self.variant)
        return gd(objective, phi, steps=1, lr=self.inner_lr)[0]

    def _piece_query(self, phi, qx, qy):
        """v = ∇L(φ), the query loss and the query metrics at the inner solution."""

        def query(p):
            loss, metric = self.loss_and_metric(p, qx, qy)
            return loss, ({} if metric is None else {"query_accuracy": metric})

        v, (q_loss, q_metrics) = grad_and_value(query, has_aux=True)(phi)
        return v, q_loss, q_metrics

    def _support_stats(self, theta, phi, support_grad, s_loss):
        grad_G = proximal_gradient(support_grad, phi, theta, lam=self.lam)
        return {"support_loss": s_loss, "inner_grad_norm": norm(grad_G)}

    def _piece_linearize(self, theta, phi, sx, sy, qx, qy):
        """v = ∇L(φ), ∇L̂(φ) and the task's statistics at the inner solution."""
        v, q_loss, q_metrics = self._piece_query(phi, qx, qy)
        support_grad, s_loss = grad_and_value(self.loss_of(sx, sy))(phi)
        return v, q_loss, q_metrics, self._support_stats(theta, phi, support_grad, s_loss)

    def _piece_matvec(self, phi, sx, sy, u):
        """u ↦ (I + H/λ)u (with the damping of ``implicit_operator``), H = ∇²L̂(φ) (or the
        Gauss–Newton matrix with ``curvature="ggn"``)."""
        H = linearize_curvature(
            self.loss_of(sx, sy), phi, curvature=self.curvature, mode=self.hvp_mode
        )[1]
        A = implicit_operator(
            H, lam=self.lam, cg_damping=self.cg_damping, lam_damping=self.lam_damping
        )
        return A(u)

    def _piece_solve(self, theta, phi, sx, sy, v):
        """The task's g = (I + H/λ)⁻¹v (with the damping of ``implicit_operator``), the
        solver's diagnostics and the support statistics, H linearised once at φ."""
        g, info, support_grad, s_loss = self._solve(self.loss_of(sx, sy), v, phi, lam=self.lam)
        return g, info, self._support_stats(theta, phi, support_grad, s_loss)

    def meta_grad_piecewise(
        self, params: Params, batch: TaskBatch, pieces: Pieces
    ) -> tuple[Params, dict[str, Tensor]]:
        """``meta_grad_tensors`` with the inner loop and the linear solver outside vmap.

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
        if (why := self.piecewise_unsupported()) is not None:
            raise ValueError(f"the piecewise meta-step does not support {why}")
        theta = self.pack(self.trainable(params))
        T = batch.num_tasks
        size = self.task_chunk or T
        parts = [
            self._piecewise_tasks(theta, TaskBatch(*(t[i : i + size] for t in batch)), pieces)
            for i in range(0, T, size)
        ]
        if len(parts) == 1:
            return self.mean_over_tasks(*parts[0])
        join = lambda dicts: {k: torch.cat([d[k] for d in dicts]) for k in dicts[0]}
        return self.mean_over_tasks(join([p[0] for p in parts]), join([p[1] for p in parts]))

    def _piecewise_tasks(
        self, theta: Params, batch: TaskBatch, pieces: Pieces
    ) -> tuple[Params, dict[str, Tensor]]:
        """``meta_grad_piecewise`` for the tasks of ``batch`` at once: each task's
        meta-gradient and statistics (leading dimension T), before the mean."""
        sx, sy, qx, qy = batch
        T = batch.num_tasks
        phi = {k: v.expand(T, *v.shape).clone() for k, v in theta.items()}  # φ₀ = θ
        for _ in range(self.inner_steps):
            phi = pieces.inner_step(theta, phi, sx, sy)
        phi = pull_back(phi, theta, lam=self.lam, inner_lr=self.inner_lr, variant=self.variant)
        if pieces.solve is not None:
            v, q_loss, q_metrics = pieces.query(phi, qx, qy)
            g, info, support = pieces.solve(theta, phi, sx, sy, v)
        else:
            v, q_loss, q_metrics, support = pieces.linearize(theta, phi, sx, sy, qx, qy)
            b, unravel = ravel(v, batch_dims=1)  # (T, n): one system per task

            def A(x):
                return ravel(pieces.matvec(phi, sx, sy, unravel(x)), batch_dims=1)[0]

            x, info = solve(A, b, method=self.solver, steps=self.cg_steps, tol=self.cg_tol)
            g = unravel(x)
        stats = {
            "support_loss": support["support_loss"],
            "query_loss": q_loss,
            "inner_grad_norm": support["inner_grad_norm"],
            "inner_iterations": torch.full((T,), self.inner_steps, device=sx.device),
            "solver_residual": info["residual"],
            "solver_iterations": info["iterations"],
            "negative_curvature": info["negative_curvature"],
            "solver_diverged": info["diverged"],
            **q_metrics,
        }  # the keys in task_meta_grad's order
        return g, stats

    def hyperparameters(self) -> dict:
        return {
            **super().hyperparameters(),
            "cg_steps": self.cg_steps,
            "cg_tol": self.cg_tol,
            "solver": self.solver,
            "cg_damping": self.cg_damping,
            "lam_damping": self.lam_damping,
            "hvp_mode": self.hvp_mode,
            "curvature": self.curvature,
            "learn_lam": self.learn_lam,
        }
