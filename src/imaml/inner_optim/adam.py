"""Adam (Kingma & Ba 2015) as an inner optimiser."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad

from ..params import Params
from ._common import all_stopped, at_step, start, still_active, where


def adam(
    objective: Callable[[Params], Tensor],
    phi0: Params,
    *,
    steps: int,
    lr: float,
    tol: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
):
    """Adam with bias correction; a task stops once ‖∇G‖ ≤ ``tol``."""
    b1, b2 = betas
    phi = phi0
    m = {k: 0.0 * p for k, p in phi0.items()}
    s = {k: 0.0 * p for k, p in phi0.items()}
    active, iters = start(phi0)
    gn = None
    for t in range(1, steps + 1):
        g = grad(at_step(objective, t - 1))(phi)
        active, gn = still_active(active, g, tol)
        if tol > 0 and all_stopped(active):
            break
        m_new = {k: b1 * m[k] + (1 - b1) * g[k] for k in phi}
        s_new = {k: b2 * s[k] + (1 - b2) * g[k] ** 2 for k in phi}
        new = {
            k: phi[k] - lr * (m_new[k] / (1 - b1**t)) / (torch.sqrt(s_new[k] / (1 - b2**t)) + eps)
            for k in phi
        }
        if tol == 0:
            phi, m, s = new, m_new, s_new
        else:
            phi, m, s = where(active, new, phi), where(active, m_new, m), where(active, s_new, s)
        iters = iters + active.long()
    return phi, {"iterations": iters, "grad_norm": gn if gn is not None else iters * 0.0}
