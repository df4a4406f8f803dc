"""The paper's "Hessian-free" inner solver: truncated Newton-CG with an Armijo line search."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..autodiff import linearize_grad
from ..linalg import cg
from ..params import Params
from ._common import all_stopped, armijo, slope, start, still_active, where


def newton_cg(
    objective: Callable[[Params], Tensor],
    phi0: Params,
    *,
    steps: int,
    lr: float = 1.0,
    tol: float = 0.0,
    cg_steps: int = 5,
    max_halvings: int = 20,
    c: float = 1e-4,
):
    """Up to ``steps`` Newton iterations on G.

    Each iteration: the search direction d from ``cg_steps`` CG steps on ∇²G(φ)·d = −∇G(φ)
    (Hessian-vector products only; CG stops at negative curvature and, if that happens
    at its first step, returns −∇G, the steepest-descent direction), then a backtracking
    Armijo line search on G from the trial step ``lr`` (the paper: 1) halving up to
    ``max_halvings`` times. A task stops once ‖∇G‖ ≤ ``tol``.
    """
    phi = phi0
    active, iters = start(phi0)
    gn = None
    for _ in range(steps):
        g, hvp = linearize_grad(objective, phi)
        active, gn = still_active(active, g, tol)
        if tol > 0 and all_stopped(active):
            break
        d, _ = cg(hvp, {k: -v for k, v in g.items()}, steps=cg_steps)
        t = armijo(
            objective, phi, d, objective(phi), slope(g, d), t0=lr, c=c, max_halvings=max_halvings
        )
        new = {k: phi[k] + t * d[k] for k in phi}
        phi = where(active, new, phi)
        iters = iters + active.long()
    return phi, {"iterations": iters, "grad_norm": gn if gn is not None else iters * 0.0}
