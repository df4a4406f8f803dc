"""Gradient descent, φ ← φ − α∇G(φ), and heavy-ball / Nesterov momentum."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.func import grad

from ..params import Params
from ._common import all_stopped, at_step, start, still_active, where


def gd(
    objective: Callable[[Params], Tensor], phi0: Params, *, steps: int, lr: float, tol: float = 0.0
):
    """Up to ``steps`` steps of size ``lr``; a task stops once ‖∇G‖ ≤ ``tol``."""
    phi = phi0
    active, iters = start(phi0)
    gn = None
    for i in range(steps):
        g = grad(at_step(objective, i))(phi)
        if tol > 0 or i == steps - 1:  # with tol = 0 only the last norm is reported
            active, gn = still_active(active, g, tol)
        if tol > 0 and all_stopped(active):
            break
        new = {k: phi[k] - lr * g[k] for k in phi}
        phi = new if tol == 0 else where(active, new, phi)
        if tol > 0:
            iters = iters + active.long()
    if tol == 0:
        iters = iters + steps
    return phi, {"iterations": iters, "grad_norm": gn if gn is not None else iters * 0.0}


def momentum(
    objective: Callable[[Params], Tensor],
    phi0: Params,
    *,
    steps: int,
    lr: float,
    tol: float = 0.0,
    beta: float = 0.9,
    nesterov: bool = False,
):
    """Heavy ball: v ← βv + ∇G(φ), φ ← φ − α·v (Nesterov: φ ← φ − α(∇G + βv))."""
    phi = phi0
    v = {k: 0.0 * p for k, p in phi0.items()}
    active, iters = start(phi0)
    gn = None
    for i in range(steps):
        g = grad(at_step(objective, i))(phi)
        if tol > 0 or i == steps - 1:
            active, gn = still_active(active, g, tol)
        if tol > 0 and all_stopped(active):
            break
        v_new = {k: beta * v[k] + g[k] for k in phi}
        step = {k: g[k] + beta * v_new[k] for k in phi} if nesterov else v_new
        new = {k: phi[k] - lr * step[k] for k in phi}
        phi, v = (new, v_new) if tol == 0 else (where(active, new, phi), where(active, v_new, v))
        if tol > 0:
            iters = iters + active.long()
    if tol == 0:
        iters = iters + steps
    return phi, {"iterations": iters, "grad_norm": gn if gn is not None else iters * 0.0}
