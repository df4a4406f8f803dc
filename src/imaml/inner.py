"""The one inner loop, shared by training and evaluation of every algorithm.

``adapt`` returns φ ≈ φ*(θ) = argmin_φ G(φ), G(φ) = L̂(φ) + (λ/2)‖φ − θ‖².
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .params import Params, add, dot, sub
from .solvers import get_inner_solver

VARIANTS = ("paper", "reference_code")


def proximal_objective(support_loss: Callable[[Params], Tensor], theta: Params, *, lam: float):
    """G(φ) = L̂(φ) + (λ/2)‖φ − θ‖²."""
    if lam == 0:
        return support_loss

    def G(phi: Params) -> Tensor:
        d = sub(phi, theta)
        return support_loss(phi) + 0.5 * lam * dot(d, d)

    return G


def adapt(
    support_loss: Callable[[Params], Tensor],
    theta: Params,
    *,
    lam: float,
    inner_steps: int,
    inner_lr: float,
    solver: str | Callable = "gd",
    variant: str = "paper",
) -> Params:
    """Approximately minimise L̂(φ) + (λ/2)‖φ − θ‖² starting from φ = θ.

    ``variant="paper"`` puts the proximal term in every step (Algorithm 2 of the paper).
    ``variant="reference_code"`` reproduces the authors' release: ``inner_steps`` steps
    on L̂ alone, then one gradient step of size ``inner_lr`` on (λ/2)‖φ − θ‖² alone,
    i.e. φ ← φ − α·λ(φ − θ).

    Differentiable in θ when θ is (MAML); iMAML calls it on a detached θ.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown inner-loop variant {variant!r}; choose one of {VARIANTS}")
    step = get_inner_solver(solver)
    if variant == "paper":
        return step(
            proximal_objective(support_loss, theta, lam=lam), theta, steps=inner_steps, lr=inner_lr
        )
    phi = step(support_loss, theta, steps=inner_steps, lr=inner_lr)
    return add(phi, sub(phi, theta), -inner_lr * lam)
