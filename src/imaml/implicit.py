"""The implicit meta-gradient of iMAML.

At an inner optimum φ* of G(φ) = L̂(φ) + (λ/2)‖φ − θ‖², ∇L̂(φ*) + λ(φ* − θ) = 0, so
dφ*/dθ = (I + H/λ)⁻¹ with H = ∇²L̂(φ*), and the task meta-gradient is

    g = (I + H/λ)⁻¹ ∇L(φ*),

found by a matrix-free solver on Hessian-vector products of L̂.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor
from torch.func import grad_and_value

from .autodiff import in_transform, linearize_curvature
from .linalg import SOLVERS, solve
from .params import Params, check_same_structure


def implicit_operator(
    hvp: Callable[[Params], Params], *, lam, cg_damping: float = 0.0, lam_damping: float = 0.0
) -> Callable[[Params], Params]:
    """The iMAML operator; the only place it is written.

    Scalar λ: v ↦ (1 + cg_damping)·v + H·v / (λ + lam_damping), the paper's I + H/λ at
    zero damping (with cg_damping = 1, lam_damping = 10 it is the authors' released code's
    2I + H/12 at λ = 2).

    One λ_k per parameter tensor (a dict): v ↦ (1 + cg_damping)·v + S·H·S·v with
    S = diag((λ_k + lam_damping)^(−1/2)), the symmetric form of I + Λ⁻¹H (see
    ``solve_implicit``); for equal λ_k it solves the same system as the scalar form.
    """
    c = 1.0 + cg_damping
    if isinstance(lam, Mapping):
        s = {k: (lam[k] + lam_damping) ** -0.5 for k in lam}

        def matvec(v: Params) -> Params:
            Hv = hvp({k: s[k] * v[k] for k in v})
            return {k: c * v[k] + s[k] * Hv[k] for k in v}

        return matvec
    d = lam + lam_damping

    def matvec(v: Params) -> Params:
        Hv = hvp(v)
        return {k: c * v[k] + Hv[k] / d for k in v}

    return matvec


def solve_implicit(
    support_loss: Callable[[Params], Tensor],
    query_grad: Params,
    phi: Params,
    *,
    lam,
    solver: str,
    steps: int,
    tol: float = 0.0,
    cg_damping: float = 0.0,
    lam_damping: float = 0.0,
    hvp_mode: str = "rev",
    curvature: str = "hessian",
    with_loss: bool = False,
) -> tuple[Params, dict[str, Tensor], Params] | tuple[Params, dict[str, Tensor], Params, Tensor]:
    """The task meta-gradient g = Λ(H + Λ)⁻¹∇L(φ) (= (I + H/λ)⁻¹∇L(φ) for a scalar λ).

    For one λ_k per tensor it solves (I + SHS)·w = S·∇L with S = Λ^(−1/2) and returns
    g = S⁻¹w. Returns (g, solver diagnostics, ∇L̂(φ)), and L̂(φ) fourth with
    ``with_loss`` (from the linearisation's own forward pass, not one more).
    ``curvature="ggn"`` puts the Gauss–Newton matrix G in place of H (``support_loss`` a
    ``imaml.autodiff.SplitLoss``): I + G/λ is then positive definite. No checks: this is
    the hot path, run under vmap by the algorithms.
    """
    support_grad, hvp, support_value = linearize_curvature(
        support_loss, phi, curvature=curvature, mode=hvp_mode, with_value=True
    )
    A = implicit_operator(hvp, lam=lam, cg_damping=cg_damping, lam_damping=lam_damping)
    if isinstance(lam, Mapping):
        s = {k: (lam[k] + lam_damping) ** -0.5 for k in lam}
        w, info = solve(
            A, {k: s[k] * query_grad[k] for k in query_grad}, method=solver, steps=steps, tol=tol
        )
        g = {k: w[k] / s[k] for k in w}
    else:
        g, info = solve(A, query_grad, method=solver, steps=steps, tol=tol)
    return (g, info, support_grad, support_value) if with_loss else (g, info, support_grad)


def lam_gradient(g: Params, support_grad: Params, lam) -> Tensor | dict[str, Tensor]:
    """dL(φ*)/d log λ from the task meta-gradient g and ∇L̂(φ*).

    Differentiating the stationarity condition ∇L̂(φ*) + Λ(φ* − θ) = 0 in λ_k gives
    dL/dλ_k = g_kᵀ∇L̂_k(φ*) / λ_k²; for a scalar λ, dL/dλ = gᵀ∇L̂(φ*)/λ² (the paper's
    formula). Returned in log-space, d/d log λ = λ·d/dλ: a scalar tensor for a scalar λ,
    a dict (one entry per tensor) for a dict λ.
    """
    if isinstance(lam, Mapping):
        return {k: (g[k] * support_grad[k]).sum() / lam[k] for k in g}
    return sum((g[k] * support_grad[k]).sum() for k in g) / lam


def check_hyperparameters(*, lam: float, steps: int, solver: str) -> None:
    if not (isinstance(lam, int | float) and lam > 0 and lam != float("inf")):
        raise ValueError(f"lam (λ, the proximal strength) must be a finite number > 0, got {lam!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")


def implicit_meta_grad(
    support_loss: Callable[[Params], Tensor],
    query_loss: Callable[[Params], Tensor],
    theta: Params,
    phi: Params,
    *,
    lam: float,
    solver: str = "cg",
    steps: int = 5,
    cg_damping: float = 0.0,
    lam_damping: float = 0.0,
    curvature: str = "hessian",
) -> dict[str, Tensor]:
    """The iMAML task meta-gradient g ≈ (I + H/λ)⁻¹ ∇query_loss(φ), H = ∇²support_loss(φ).

    ``phi`` should approximately minimise support_loss(φ) + (λ/2)‖φ − θ‖²; the result
    depends only on φ (not on how it was found). ``theta`` is checked to have the keys
    and shapes of ``phi``. ``solver`` is one of ``imaml.linalg.SOLVERS`` run for
    ``steps`` steps. With damping the operator is
    (1 + cg_damping)·I + H/(λ + lam_damping). ``curvature="ggn"`` uses the Gauss–Newton
    matrix in place of H; ``support_loss`` must then be an ``imaml.autodiff.SplitLoss``.

    Raises ValueError on λ ≤ 0, negative steps, an unknown solver, mismatched
    ``theta``/``phi`` or a non-finite loss.
    """
    check_hyperparameters(lam=lam, steps=steps, solver=solver)
    check_same_structure(theta, phi, names=("theta", "phi"))
    phi = {k: v.detach() for k, v in phi.items()}
    query_grad, query_value = grad_and_value(query_loss)(phi)
    support_value = support_loss(phi)
    for name, value in (("query_loss", query_value), ("support_loss", support_value)):
        if not in_transform(value) and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name}(phi) is not finite ({value.item()}); check inputs and φ")
    g, _, _ = solve_implicit(
        support_loss,
        query_grad,
        phi,
        lam=lam,
        solver=solver,
        steps=steps,
        cg_damping=cg_damping,
        lam_damping=lam_damping,
        curvature=curvature,
    )
    return g
