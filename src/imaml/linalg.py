"""Solvers for A·x = b given only the map ``matvec: x ↦ A·x``.

``A`` is symmetric (for iMAML it is I + H/λ with H the support-loss Hessian). Each
solver takes ``b`` as a tensor or a parameter dict, runs a fixed number of steps with
per-task masks instead of Python branches (so it runs unchanged under
``torch.func.vmap`` over tasks), and returns ``(x, info)`` where ``info`` holds 0-dim
tensors. A 2-D ``b`` of shape (T, n) is T independent systems solved together outside
vmap (``matvec`` maps (T, n) to (T, n) row by row; every dot product, step size and
stopping test is per row and ``info`` holds tensors of shape (T,)); this is what lets a
batched meta-step compile its Hessian-vector product once instead of once per solver
step (``imaml.fast.meta_grad_piecewise``).

``info``:

- ``iterations``: steps taken before the task converged or stopped;
- ``residual``: ‖b − A·x‖ / ‖b‖ (the solver's recursive estimate);
- ``negative_curvature``: whether a direction with pᵀAp ≤ 0 was met, i.e. A is not
  positive definite on the explored Krylov subspace;
- ``diverged``: whether the solve ran away (Neumann: the residual grew, i.e. the
  spectrum of αA left (0, 2); any solver: a non-finite residual for ``exact``). The
  algorithms drop such a task from the meta-batch mean, as they drop non-finite ones.

Solvers:

- ``cg``: conjugate gradient with negative-curvature truncation. CG is only sound for
  positive-definite A; when it meets pᵀAp ≤ 0 it stops and keeps its last iterate (the
  CG solution on the subspace where A was positive definite). If that happens at the
  very first step, it returns ``b`` itself, the answer of A = I (for iMAML: the
  first-order, λ → ∞ meta-gradient), rather than zero.
- ``minres``: MINRES (Paige & Saunders 1975), correct for symmetric *indefinite* A; the
  residual norm never increases.
- ``neumann``: truncated Neumann series / Richardson iteration
  x ← x + α(b − A·x), i.e. x_K = α Σ_{j<K} (I − αA)^j b; converges iff the spectrum
  of αA lies in (0, 2).
- ``exact``: forms A densely from ``n`` matvecs and calls ``torch.linalg.solve``; for
  tests and small models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .checks import check_int, check_number
from .params import ravel

SOLVERS = ("cg", "minres", "neumann", "exact")

Vector = Tensor | dict[str, Tensor]


def _flat_problem(matvec: Callable, b: Vector, x0: Vector | None):
    """Return (flat matvec, flat b, flat x0 or None, unravel) for tensor or dict ``b``."""
    if isinstance(b, Tensor):
        if b.dim() not in (1, 2):
            raise ValueError(
                "b must be a 1-D tensor (one system), a 2-D tensor (one system per row) or a "
                f"parameter dict, got shape {tuple(b.shape)}"
            )
        return matvec, b, x0, lambda v: v
    bf, unravel = ravel(b)

    def mv(v: Tensor) -> Tensor:
        return ravel(matvec(unravel(v)))[0]

    x0f = None if x0 is None else ravel(x0)[0]
    return mv, bf, x0f, unravel


def _check(steps: int, tol: float):
    check_int("steps", steps)
    check_number("tol", tol, positive=False)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise ⟨a, b⟩ with the last dimension kept (shape (1,) or (T, 1)), so it scales
    the rows of a (T, n) batch by broadcasting."""
    return (a * b).sum(-1, keepdim=True)


def _norm(a: Tensor) -> Tensor:
    return torch.linalg.vector_norm(a, dim=-1, keepdim=True)


def _info(
    iterations: Tensor, residual: Tensor, negative: Tensor, diverged: Tensor | None = None
) -> dict[str, Tensor]:
    """The diagnostics, one entry per system: 0-dim for one system, (T,) for T."""
    if diverged is None:
        diverged = torch.zeros_like(negative)
    return {
        "iterations": iterations.squeeze(-1),
        "residual": residual.squeeze(-1),
        "negative_curvature": negative.squeeze(-1),
        "diverged": diverged.squeeze(-1),
    }


def _start(A: Callable, b: Tensor, x: Tensor | None) -> tuple[Tensor, Tensor]:
    """The first iterate and its residual b − A·x: (0, b) without a starting point."""
    if x is None:
        return torch.zeros_like(b), b.clone()
    return x, b - A(x)


def _safe(d: Tensor) -> Tensor:
    """``d`` where it is non-zero, else 1 (a divisor that never makes inf or NaN)."""
    return torch.where(d != 0, d, torch.ones_like(d))


def cg(matvec: Callable, b: Vector, *, steps: int, tol: float = 0.0, x0: Vector | None = None):
    """Conjugate gradient for positive-definite A, truncated at negative curvature."""
    _check(steps, tol)
    A, b, x, unravel = _flat_problem(matvec, b, x0)
    bnorm = _norm(b)
    x, r = _start(A, b, x)
    p = r
    rr = _dot(r, r)
    active = rr > (tol * bnorm) ** 2
    negative = torch.zeros_like(active)
    neg_at_start = torch.zeros_like(active)
    fallback_rr = rr
    iterations = torch.zeros_like(active, dtype=torch.int64)
    for k in range(steps):
        Ap = A(p)
        pAp = _dot(p, Ap)
        neg_now = active & (pAp <= 0)
        if k == 0:
            neg_at_start = neg_now
            if x0 is None:  # p = b here, so ‖b − A·b‖² is the residual of returning b
                fallback_rr = _dot(b - Ap, b - Ap)
        negative = negative | neg_now
        active = active & ~neg_now
        alpha = torch.where(active, rr / _safe(pAp), torch.zeros_like(rr))
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = _dot(r, r)
        iterations = iterations + active.long()
        active = active & (rr_new > (tol * bnorm) ** 2)
        beta = torch.where(active, rr_new / _safe(rr), torch.zeros_like(rr))
        p = r + beta * p
        rr = rr_new
    if x0 is None:
        # Negative curvature before any step: return b, the solution for A = I.
        x = torch.where(neg_at_start, b, x)
        rr = torch.where(neg_at_start, fallback_rr, rr)
    residual = torch.sqrt(rr) / _safe(bnorm)
    return unravel(x), _info(iterations, residual, negative)


def minres(matvec: Callable, b: Vector, *, steps: int, tol: float = 0.0, x0: Vector | None = None):
    """MINRES for symmetric (possibly indefinite) A; ‖b − A·x_k‖ is non-increasing in k."""
    _check(steps, tol)
    A, b, x, unravel = _flat_problem(matvec, b, x0)
    bnorm = _norm(b)
    x, r1 = _start(A, b, x)
    zero = torch.zeros_like(bnorm)
    y = r1
    r2 = r1
    beta = _norm(r1)
    oldb = zero
    dbar = zero
    epsln = zero
    phibar = beta
    cs = -torch.ones_like(bnorm)
    sn = zero
    w = torch.zeros_like(b)
    w2 = torch.zeros_like(b)
    pivot = zero  # the last LDLᵀ pivot of the Lanczos tridiagonal T_k
    active = phibar > tol * bnorm
    negative = torch.zeros_like(active)
    iterations = torch.zeros_like(active, dtype=torch.int64)
    tiny = torch.finfo(b.dtype).tiny
    for k in range(steps):
        v = y / _safe(beta)
        y = A(v)
        if k > 0:
            y = y - (beta / _safe(oldb)) * r1
        alfa = _dot(v, y)  # Rayleigh quotient vᵀAv of the Lanczos vector
        # A is positive definite on the Krylov space iff the Lanczos tridiagonal T_k is,
        # iff every pivot of T_k = LDLᵀ is > 0 (the pivots are CG's pᵀAp up to scale)
        pivot = alfa if k == 0 else alfa - beta**2 / _safe(pivot)
        negative = negative | (active & (pivot <= 0))
        y = y - (alfa / _safe(beta)) * r2
        r1 = r2
        r2 = y
        oldb = beta
        beta = _norm(y)
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.clamp(torch.sqrt(gbar**2 + beta**2), min=tiny)
        cs = gbar / gamma
        sn = beta / gamma
        phi = cs * phibar
        w1 = w2
        w2 = w
        w = (v - oldeps * w1 - delta * w2) / gamma
        x = torch.where(active, x + phi * w, x)
        phibar = torch.where(active, sn * phibar, phibar)
        iterations = iterations + active.long()
        # Stop at the tolerance, or when the Krylov space is exhausted (β = 0).
        active = active & (phibar > tol * bnorm) & (beta > tiny)
    residual = phibar / _safe(bnorm)
    return unravel(x), _info(iterations, residual, negative)


def neumann(
    matvec: Callable,
    b: Vector,
    *,
    steps: int,
    tol: float = 0.0,
    x0: Vector | None = None,
    alpha: float = 1.0,
):
    """Truncated Neumann series: x ← x + α(b − A·x), converging iff spec(αA) ⊂ (0, 2)."""
    _check(steps, tol)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    A, b, x, unravel = _flat_problem(matvec, b, x0)
    bnorm = _norm(b)
    x, r = _start(A, b, x)
    rnorm = _norm(r)
    r0norm = rnorm
    active = rnorm > tol * bnorm
    iterations = torch.zeros_like(active, dtype=torch.int64)
    for _ in range(steps):
        Ar = A(r)
        x = torch.where(active, x + alpha * r, x)
        r = torch.where(active, r - alpha * Ar, r)
        rnorm = _norm(r)
        iterations = iterations + active.long()
        active = active & (rnorm > tol * bnorm)
    residual = rnorm / _safe(bnorm)
    negative = torch.zeros_like(active)
    # the series diverges when the spectrum of αA leaves (0, 2): the residual then grows
    diverged = (rnorm > r0norm) | ~torch.isfinite(rnorm)
    return unravel(x), _info(iterations, residual, negative, diverged)


def dense_matrix(matvec: Callable, n: int, *, dtype=None, device=None) -> Tensor:
    """The n×n matrix of a linear map on flat vectors, from n matvecs (batched with vmap)."""
    eye = torch.eye(n, dtype=dtype, device=device)
    return torch.func.vmap(matvec)(eye).transpose(-1, -2)


def exact(
    matvec: Callable, b: Vector, *, steps: int = 0, tol: float = 0.0, x0: Vector | None = None
):
    """Dense solve: forms A from n matvecs and calls ``torch.linalg.solve`` (small n only)."""
    del steps, tol, x0  # a direct solve needs none of them
    A, b, _, unravel = _flat_problem(matvec, b, None)
    if b.dim() != 1:
        raise ValueError("the exact solver solves one system: b must be 1-D or a parameter dict")
    n = b.shape[-1]
    M = dense_matrix(A, n, dtype=b.dtype, device=b.device)
    M = 0.5 * (M + M.transpose(-1, -2))
    x = torch.linalg.solve(M, b)
    bnorm = torch.linalg.vector_norm(b)
    residual = torch.linalg.vector_norm(b - M @ x) / _safe(bnorm)
    negative = torch.linalg.eigvalsh(M)[..., 0] <= 0
    iterations = torch.zeros((), dtype=torch.int64, device=b.device) + n
    return unravel(x), {
        "iterations": iterations,
        "residual": residual,
        "negative_curvature": negative,
        "diverged": ~torch.isfinite(residual),
    }


_BY_NAME = {"cg": cg, "minres": minres, "neumann": neumann, "exact": exact}


def solve(
    matvec: Callable,
    b: Vector,
    *,
    method: str = "cg",
    steps: int,
    tol: float = 0.0,
    x0: Vector | None = None,
):
    """Solve A·x = b with the named method (one of ``SOLVERS``)."""
    try:
        fn = _BY_NAME[method]
    except KeyError:
        raise ValueError(f"unknown solver {method!r}; choose one of {', '.join(SOLVERS)}") from None
    return fn(matvec, b, steps=steps, tol=tol, x0=x0)
