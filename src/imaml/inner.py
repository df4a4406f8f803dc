"""The one inner loop, shared by training and evaluation of every algorithm.

``adapt`` returns φ ≈ φ*(θ) = argmin_φ G(φ), G(φ) = L̂(φ) + (λ/2)‖φ − θ‖², or with one
λ per parameter tensor, G(φ) = L̂(φ) + ½ Σ_k λ_k ‖φ_k − θ_k‖².
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

from torch import Tensor

from .params import Params
from .solvers import get_inner_solver

VARIANTS = ("paper", "reference_code")
Lam = float | Tensor | Mapping[str, float | Tensor]


def _lam_of(lam: Lam, key: str):
    return lam[key] if isinstance(lam, Mapping) else lam


def proximal_objective(support_loss: Callable[[Params], Tensor], theta: Params, *, lam: Lam):
    """G(φ) = L̂(φ) + ½ Σ_k λ_k‖φ_k − θ_k‖² (λ_k = λ for a scalar λ)."""
    if not isinstance(lam, Mapping | Tensor) and lam == 0:
        return support_loss

    def G(phi: Params) -> Tensor:
        prox = sum(_lam_of(lam, k) * ((phi[k] - theta[k]) ** 2).sum() for k in phi)
        return support_loss(phi) + 0.5 * prox

    return G


def inner_objective(support_loss: Callable[[Params], Tensor], theta: Params, *, lam: Lam, variant):
    """What the inner solver minimises: G(φ) for the paper's variant, L̂(φ) alone for the
    authors' release (``reference_code``), whose proximal term comes in ``pull_back``."""
    return proximal_objective(support_loss, theta, lam=lam) if variant == "paper" else support_loss


def pull_back(phi: Params, theta: Params, *, lam: Lam, inner_lr: float, variant: str) -> Params:
    """After the solver: for ``reference_code``, one gradient step of size ``inner_lr`` on
    ½ Σ_k λ_k‖φ_k − θ_k‖², i.e. φ ← φ − α·λ(φ − θ); the paper's variant is left as it is."""
    if variant == "paper":
        return phi
    return {k: phi[k] - inner_lr * _lam_of(lam, k) * (phi[k] - theta[k]) for k in phi}


def proximal_gradient(support_grad: Params, phi: Params, theta: Params, *, lam: Lam) -> Params:
    """∇G(φ) = ∇L̂(φ) + Λ(φ − θ), from ∇L̂(φ); zero at the exact inner solution."""
    return {k: support_grad[k] + _lam_of(lam, k) * (phi[k] - theta[k]) for k in phi}


def solver_options(solver: str | Callable, options: Mapping | None) -> dict:
    """The subset of ``options`` that ``solver`` accepts (e.g. ``cg_steps`` for newton_cg)."""
    if not options:
        return {}
    accepted = inspect.signature(get_inner_solver(solver)).parameters
    return {k: v for k, v in options.items() if k in accepted}


def adapt(
    support_loss: Callable[[Params], Tensor],
    theta: Params,
    *,
    lam: Lam,
    inner_steps: int,
    inner_lr: float,
    solver: str | Callable = "gd",
    variant: str = "paper",
    tol: float = 0.0,
    options: Mapping | None = None,
    return_info: bool = False,
):
    """Approximately minimise L̂(φ) + (λ/2)‖φ − θ‖² starting from φ = θ.

    ``solver`` is a name in ``imaml.solvers.INNER_SOLVERS`` or a callable with the shared
    solver signature; it runs up to ``inner_steps`` iterations, stopping a task once
    ‖∇G(φ)‖ ≤ ``tol``; ``options`` go to the solvers that take them.

    ``variant="paper"`` puts the proximal term in every step (Algorithm 2 of the paper).
    ``variant="reference_code"`` reproduces the authors' release: ``inner_steps`` steps
    on L̂ alone, then one gradient step of size ``inner_lr`` on (λ/2)‖φ − θ‖² alone,
    i.e. φ ← φ − α·λ(φ − θ).

    Differentiable in θ when θ is (MAML); iMAML calls it on a detached θ. Returns φ, or
    (φ, info) with ``return_info`` (info: ``iterations``, ``grad_norm``).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown inner-loop variant {variant!r}; choose one of {VARIANTS}")
    run = get_inner_solver(solver)
    opts = solver_options(solver, options)
    objective = inner_objective(support_loss, theta, lam=lam, variant=variant)
    phi, info = run(objective, theta, steps=inner_steps, lr=inner_lr, tol=tol, **opts)
    phi = pull_back(phi, theta, lam=lam, inner_lr=inner_lr, variant=variant)
    return (phi, info) if return_info else phi
