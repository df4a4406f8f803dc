"""Helpers shared by the inner solvers: masked updates and a batched Armijo line search."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..autodiff import in_transform
from ..params import Params, dot, norm


def at_step(objective: Callable[[Params], Tensor], t: int) -> Callable[[Params], Tensor]:
    """What inner step t minimises: the objective itself, or, for an objective with
    mini-batches (``imaml.inner.MiniBatched``), its mini-batch t."""
    at = getattr(objective, "at", None)
    return objective if at is None else at(t)


def start(phi0: Params) -> tuple[Tensor, Tensor]:
    """(active mask, iteration counter) as 0-dim tensors on φ's device."""
    ref = next(iter(phi0.values()))
    active = torch.ones((), dtype=torch.bool, device=ref.device)
    return active, torch.zeros((), dtype=torch.int64, device=ref.device)


def still_active(active: Tensor, grad: Params, tol: float) -> tuple[Tensor, Tensor]:
    """Deactivate tasks whose ‖∇G‖ ≤ tol; return (mask, ‖∇G‖)."""
    gn = norm(grad)
    if tol > 0:
        active = active & (gn > tol)
    return active, gn


def all_stopped(active: Tensor) -> bool:
    """True when no task is active and the values can be read, i.e. outside vmap/grad.

    Under a torch.func transform the loop must run its fixed number of steps (masked);
    outside one a solver may return as soon as every task has met its tolerance.
    """
    return not in_transform(active) and not bool(active.any())


def where(mask: Tensor, new: Params, old: Params) -> Params:
    return {k: torch.where(mask, new[k], old[k]) for k in old}


def armijo(
    objective: Callable[[Params], Tensor],
    phi: Params,
    direction: Params,
    value: Tensor,
    slope: Tensor,
    *,
    t0: float = 1.0,
    shrink: float = 0.5,
    c: float = 1e-4,
    max_halvings: int = 20,
) -> Tensor:
    """Step size t = t0·shrink^j for the smallest j with G(φ + t·d) ≤ G(φ) + c·t·∇Gᵀd.

    Batched backtracking: every task evaluates the same trial steps, a mask keeps the
    first accepted one. If none is accepted, t = 0 (the task does not move).
    """
    t = torch.zeros_like(value)
    found = torch.zeros_like(value, dtype=torch.bool)
    trial = t0
    for _ in range(max_halvings):
        cand = {k: phi[k] + trial * direction[k] for k in phi}
        # a NaN trial value compares False, so it is rejected like an increase
        ok = (objective(cand) <= value + c * trial * slope) & ~found
        t = torch.where(ok, torch.full_like(t, trial), t)
        found = found | ok
        trial *= shrink
    return t


def slope(grad: Params, direction: Params) -> Tensor:
    return dot(grad, direction)
