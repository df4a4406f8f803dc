"""Inner optimisers: each minimises an objective G(φ) from a starting point.

Shared signature: ``solver(objective, phi0, *, steps, lr, tol=0.0, **options) -> (phi, info)``
where ``objective`` maps a parameter dict to a scalar tensor and ``info`` holds 0-dim
tensors ``iterations`` (steps actually taken) and ``grad_norm`` (‖∇G‖ at the last point
where it was evaluated). A task stops early once ‖∇G(φ)‖ ≤ ``tol``: because G is
λ-strongly convex in the proximal term's direction, this bounds the inner error δ of
Algorithm 2 (‖φ − φ*‖ ≤ tol/λ when G is λ-strongly convex). Stopping is a per-task
mask, not a Python branch, so every solver runs unchanged under ``torch.func.vmap``, and
every solver is differentiable when its inputs are (MAML uses that; iMAML never
differentiates through a solver).
"""

from __future__ import annotations

from collections.abc import Callable

from .adam import adam
from .gd import gd, momentum
from .lbfgs import lbfgs
from .newton_cg import newton_cg

INNER_SOLVERS: dict[str, Callable] = {
    "gd": gd,
    "momentum": momentum,
    "adam": adam,
    "newton_cg": newton_cg,
    "lbfgs": lbfgs,
}


def get_inner_solver(name_or_fn: str | Callable) -> Callable:
    if callable(name_or_fn):
        return name_or_fn
    try:
        return INNER_SOLVERS[name_or_fn]
    except KeyError:
        raise ValueError(
            f"unknown inner solver {name_or_fn!r}; choose one of {', '.join(INNER_SOLVERS)}"
        ) from None


__all__ = ["INNER_SOLVERS", "adam", "gd", "get_inner_solver", "lbfgs", "momentum", "newton_cg"]
