"""L-BFGS (limited-memory quasi-Newton) with an Armijo line search, batched with masks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad

from ..params import Params, ravel
from ._common import all_stopped, armijo, start, still_active


def lbfgs(
    objective: Callable[[Params], Tensor],
    phi0: Params,
    *,
    steps: int,
    lr: float = 1.0,
    tol: float = 0.0,
    history: int = 10,
    max_halvings: int = 20,
    c: float = 1e-4,
):
    """Up to ``steps`` L-BFGS iterations keeping ``history`` curvature pairs.

    The direction is −H_k∇G from the two-loop recursion with H₀ = γI, γ = sᵀy/yᵀy of the
    newest pair; a pair is kept only if sᵀy > 1e-10·‖s‖‖y‖ (slots of unkept or not-yet-
    filled pairs have ρ = 0 and drop out of the recursion). Step size by Armijo
    backtracking from ``lr`` (1 is the natural L-BFGS step).
    """
    x0, unravel = ravel(phi0)
    f = lambda x: objective(unravel(x))
    g_fn = grad(f)
    x = x0
    n = x0.shape[-1]
    S = x0.new_zeros(history, n)
    Y = x0.new_zeros(history, n)
    rho = x0.new_zeros(history)
    gamma = x0.new_ones(())
    active, iters = start(phi0)
    g = g_fn(x)
    gn = None
    for k in range(steps):
        active, gn = still_active(active, {"x": g}, tol)
        if tol > 0 and all_stopped(active):
            break
        # two-loop recursion over the ring buffer, newest pair first
        q = g
        alphas = []
        for j in range(min(k, history)):
            i = (k - 1 - j) % history
            a = rho[i] * (S[i] @ q)
            q = q - a * Y[i]
            alphas.append((i, a))
        r = gamma * q
        for i, a in reversed(alphas):
            b = rho[i] * (Y[i] @ r)
            r = r + (a - b) * S[i]
        d = -r
        # safeguard: fall back to steepest descent if d is not a descent direction
        descent = (g @ d) < 0
        d = torch.where(descent, d, -g)
        value = f(x)
        t = armijo(
            lambda p: f(p["x"]),
            {"x": x},
            {"x": d},
            value,
            g @ d,
            t0=lr,
            c=c,
            max_halvings=max_halvings,
        )
        x_new = x + t * d
        g_new = g_fn(x_new)
        s, y = x_new - x, g_new - g
        sy = s @ y
        keep = active & (sy > 1e-10 * torch.linalg.vector_norm(s) * torch.linalg.vector_norm(y))
        slot = k % history
        S = torch.cat([S[:slot], torch.where(keep, s, S[slot])[None], S[slot + 1 :]])
        Y = torch.cat([Y[:slot], torch.where(keep, y, Y[slot])[None], Y[slot + 1 :]])
        rho_new = torch.where(
            keep, 1.0 / torch.where(keep, sy, torch.ones_like(sy)), torch.zeros_like(sy)
        )
        rho = torch.cat([rho[:slot], rho_new[None], rho[slot + 1 :]])
        gamma = torch.where(keep, sy / torch.where(keep, y @ y, torch.ones_like(sy)), gamma)
        x = torch.where(active, x_new, x)
        g = torch.where(active, g_new, g)
        iters = iters + active.long()
    return unravel(x), {"iterations": iters, "grad_norm": gn if gn is not None else iters * 0.0}
