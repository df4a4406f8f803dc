"""The one inner loop, shared by training and evaluation of every algorithm.

``adapt`` returns φ ≈ φ*(θ) = argmin_φ G(φ), G(φ) = L̂(φ) + (λ/2)‖φ − θ‖², or with one
λ per parameter tensor, G(φ) = L̂(φ) + ½ Σ_k λ_k ‖φ_k − θ_k‖².
"""

from __future__ import annotations

import functools
import inspect
import random
from collections.abc import Callable, Mapping
from typing import NamedTuple

from torch import Tensor

from .checks import check_int, check_number
from .inner_optim import INNER_SOLVERS, get_inner_solver
from .inner_optim._common import at_step
from .params import Params

VARIANTS = ("paper", "reference_code")
# the inner solvers that can take each step on a mini-batch of the support set
MINI_BATCH_SOLVERS = ("gd", "momentum", "adam")
Lam = float | Tensor | Mapping[str, float | Tensor]


class MiniBatched(NamedTuple):
    """L̂ on the whole support set when called; ``at(t)``: L̂ on inner step t's mini-batch,
    on which the first-order solvers (``MINI_BATCH_SOLVERS``) take step t."""

    full: Callable[[Params], Tensor]
    batches: tuple[Callable[[Params], Tensor], ...]

    def __call__(self, phi: Params) -> Tensor:
        return self.full(phi)

    def at(self, t: int) -> Callable[[Params], Tensor]:
        return self.batches[t % len(self.batches)]


@functools.cache
def batch_order(n: int, batch: int, steps: int) -> tuple[tuple[int, ...], ...]:
    """The support examples (of ``n``) each of ``steps`` inner steps uses: epochs of a
    fixed pseudo-random order of range(n), a new order each epoch and the same for every
    task, cut into consecutive batches of ``batch`` (so one epoch is n / batch steps, and
    a support set sorted by class still gives mixed batches)."""
    rng, order = random.Random(0), []  # Python's RNG: torch's is vmap's inside a transform
    while len(order) < steps * batch:
        epoch = list(range(n))
        rng.shuffle(epoch)
        order += epoch
    return tuple(tuple(order[t * batch : (t + 1) * batch]) for t in range(steps))


def _lam_of(lam: Lam, key: str):
    return lam[key] if isinstance(lam, Mapping) else lam


class Proximal(NamedTuple):
    """G(φ) = L̂(φ) + ½ Σ_k λ_k‖φ_k − θ_k‖², with its parts kept for the solvers that
    use them (Newton-CG's Gauss–Newton curvature needs L̂ as a ``SplitLoss``)."""

    support_loss: Callable[[Params], Tensor]
    theta: Params
    lam: Lam

    def at(self, t: int) -> Proximal:
        """G on inner step t's mini-batch (``MiniBatched``), the proximal term unchanged."""
        return Proximal(at_step(self.support_loss, t), self.theta, self.lam)

    def __call__(self, phi: Params) -> Tensor:
        lam, theta = self.lam, self.theta
        prox = sum(_lam_of(lam, k) * ((phi[k] - theta[k]) ** 2).sum() for k in phi)
        return self.support_loss(phi) + 0.5 * prox


def proximal_objective(support_loss: Callable[[Params], Tensor], theta: Params, *, lam: Lam):
    """G(φ) = L̂(φ) + ½ Σ_k λ_k‖φ_k − θ_k‖² (λ_k = λ for a scalar λ)."""
    if not isinstance(lam, Mapping | Tensor) and lam == 0:
        return support_loss
    return Proximal(support_loss, theta, lam)


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


def _keyword_options(fn: Callable) -> set[str]:
    shared = {"objective", "phi0", "steps", "lr", "tol"}
    params = inspect.signature(fn).parameters
    return {k for k, p in params.items() if p.kind == p.KEYWORD_ONLY} - shared


def solver_options(solver: str | Callable, options: Mapping | None) -> dict:
    """The subset of ``options`` that ``solver`` accepts (e.g. ``cg_steps`` for newton_cg).

    An option no inner solver takes is an error (a typo would otherwise do nothing); one
    that another solver takes is dropped, so one options dict serves every solver."""
    if not options:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"options must be a dict, got {type(options).__name__}")
    fn = get_inner_solver(solver)
    if any(p.kind == p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values()):
        return dict(options)  # a solver of one's own that takes any option
    accepted = _keyword_options(fn)
    known = set().union(accepted, *(_keyword_options(f) for f in INNER_SOLVERS.values()))
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"unknown inner-solver options {unknown}; the inner solvers take {sorted(known)}"
        )
    return {k: v for k, v in options.items() if k in accepted}


def check_mini_batch(solver, tol) -> None:
    """ValueError, in one line, where mini-batched inner steps cannot apply."""
    if not (isinstance(solver, str) and solver in MINI_BATCH_SOLVERS):
        name = solver if isinstance(solver, str) else "a solver of one's own"
        raise ValueError(
            f"inner_batch (mini-batched inner steps) needs a first-order inner solver "
            f"({', '.join(MINI_BATCH_SOLVERS)}), not {name}"
        )
    if tol > 0:
        raise ValueError(
            "inner_batch and inner_tol > 0 do not combine: a mini-batch's gradient norm does "
            "not say whether the inner problem is solved; set inner_tol 0"
        )


def _check_adapt(lam, inner_steps, inner_lr, tol) -> None:
    """One-line errors for the inner loop's numbers (a tensor λ, e.g. learned, is not read)."""
    for v in lam.values() if isinstance(lam, Mapping) else [lam]:
        if not isinstance(v, Tensor):
            check_number("lam (λ)", v, positive=False)
    check_int("inner_steps", inner_steps)
    check_number("inner_lr", inner_lr, positive=True)
    check_number("tol", tol, positive=False)


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
    A ``MiniBatched`` ``support_loss`` (``MetaAlgorithm(inner_batch=...)`` builds one)
    has step t of gd, momentum or adam use its mini-batch t (Nichol et al.'s Reptile).

    ``variant="reference_code"`` reproduces the authors' release: ``inner_steps`` steps
    on L̂ alone, then one gradient step of size ``inner_lr`` on (λ/2)‖φ − θ‖² alone,
    i.e. φ ← φ − α·λ(φ − θ).

    Differentiable in θ when θ is (MAML); iMAML calls it on a detached θ. Returns φ, or
    (φ, info) with ``return_info`` (info: ``iterations``, ``grad_norm``). ValueError, in
    one line, for λ < 0, inner_steps < 0, inner_lr ≤ 0, tol < 0 or an unknown option.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown inner-loop variant {variant!r}; choose one of {VARIANTS}")
    _check_adapt(lam, inner_steps, inner_lr, tol)
    if isinstance(support_loss, MiniBatched):
        check_mini_batch(solver, tol)
    run = get_inner_solver(solver)
    opts = solver_options(solver, options)
    objective = inner_objective(support_loss, theta, lam=lam, variant=variant)
    phi, info = run(objective, theta, steps=inner_steps, lr=inner_lr, tol=tol, **opts)
    phi = pull_back(phi, theta, lam=lam, inner_lr=inner_lr, variant=variant)
    return (phi, info) if return_info else phi
