"""iMAML: the implicit meta-gradient g = (I + H/λ)⁻¹ ∇L(φ), H = ∇²L̂(φ), at the inner solution φ."""

from __future__ import annotations

import math

import torch
from torch.func import grad_and_value

from ..autodiff import CURVATURES, HVP_MODES
from ..checks import check_choice, check_number
from ..implicit import check_hyperparameters, lam_gradient, solve_implicit
from ..inner import proximal_gradient
from ..params import Params, norm
from .base import MetaAlgorithm

DEFAULT_SOLVER = "minres"  # sound on indefinite I + H/λ; see benchmarks/solver_accuracy.py
LEARN_LAM = ("none", "scalar", "per_tensor")
LOG_LAM = "log_lam"  # key of a learned scalar log λ; per tensor: "log_lam:<parameter name>"


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
        inner_batch: int | None = None,
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
            inner_batch=inner_batch,
            batched=batched,
            # one λ per tensor needs the tensors apart (Λ is keyed by parameter name)
            flat=False if learn_lam == "per_tensor" else flat,
            task_chunk=task_chunk,
        )
        check_hyperparameters(lam=lam, steps=cg_steps, solver=solver)
        check_number("cg_tol", cg_tol, positive=False)
        check_number("cg_damping", cg_damping, positive=False)
        check_number("lam_damping", lam_damping, positive=False)
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"unknown hvp_mode {hvp_mode!r}; choose one of {HVP_MODES}")
        check_choice("curvature", curvature, CURVATURES)
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
        phi, inner = self.adapt_with_info(theta, sx, sy)
        v, q_loss, q_metrics = self.query_gradient(phi, qx, qy)  # v = ∇L(φ)
        g, info, support_grad, s_loss = self.implicit_solve(self.loss_of(sx, sy), v, phi, lam=lam)
        stats = {
            **self.support_stats(model_theta, phi, support_grad, s_loss, lam=lam),
            "query_loss": q_loss,
            "inner_iterations": inner["iterations"],
            **self.solver_stats(info),
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

    def query_gradient(self, phi, qx, qy):
        """v = ∇L(φ), the query loss and the query metrics at the inner solution."""

        def query(p):
            loss, metric = self.loss_and_metric(p, qx, qy)
            return loss, ({} if metric is None else {"query_accuracy": metric})

        v, (q_loss, q_metrics) = grad_and_value(query, has_aux=True)(phi)
        return v, q_loss, q_metrics

    @staticmethod
    def support_stats(theta, phi, support_grad, s_loss, *, lam) -> dict:
        """L̂(φ) and ‖∇G(φ)‖, how far the inner problem is from solved."""
        grad_G = proximal_gradient(support_grad, phi, theta, lam=lam)
        return {"support_loss": s_loss, "inner_grad_norm": norm(grad_G)}

    @staticmethod
    def solver_stats(info) -> dict:
        return {
            "solver_residual": info["residual"],
            "solver_iterations": info["iterations"],
            "negative_curvature": info["negative_curvature"],
            "solver_diverged": info["diverged"],
        }

    def implicit_solve(self, support_loss, v, phi, *, lam):
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
