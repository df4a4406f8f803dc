"""Plain gradient descent: φ ← φ − α∇G(φ)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.func import grad

from ..params import Params, add


def gd(objective: Callable[[Params], Tensor], phi0: Params, *, steps: int, lr: float) -> Params:
    """``steps`` gradient-descent steps of size ``lr`` on ``objective`` from ``phi0``."""
    g_fn = grad(objective)
    phi = phi0
    for _ in range(steps):
        phi = add(phi, g_fn(phi), -lr)
    return phi
