"""Inner optimisers: each minimises an objective G(φ) from a starting point.

Signature shared by all: ``solver(objective, phi0, *, steps, lr) -> phi`` where
``objective`` maps a parameter dict to a scalar tensor. Solvers are pure, take a fixed
number of steps (so they run under ``torch.func.vmap``), and are differentiable when
their inputs are (which MAML uses; iMAML never differentiates through them).
"""

from __future__ import annotations

from collections.abc import Callable

from .gd import gd

INNER_SOLVERS: dict[str, Callable] = {"gd": gd}


def get_inner_solver(name_or_fn: str | Callable) -> Callable:
    if callable(name_or_fn):
        return name_or_fn
    try:
        return INNER_SOLVERS[name_or_fn]
    except KeyError:
        raise ValueError(
            f"unknown inner solver {name_or_fn!r}; choose one of {', '.join(INNER_SOLVERS)}"
        ) from None


__all__ = ["INNER_SOLVERS", "get_inner_solver", "gd"]
