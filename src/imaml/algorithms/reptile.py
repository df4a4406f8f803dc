"""Reptile: the meta-gradient is θ − φ."""

from __future__ import annotations

from .base import MetaAlgorithm


class Reptile(MetaAlgorithm):
    """Reptile (Nichol et al. 2018). The returned meta-gradient is g = θ − φ, unscaled:
    plain SGD with outer learning rate ε on it is Reptile's update θ ← θ + ε(φ − θ); the
    default outer optimiser (Adam) uses it as any other gradient. The query set is used
    only for the reported statistics. ``lam`` = 0 (default) is the original inner loop."""

    name = "reptile"

    def __init__(
        self,
        *,
        model,
        loss="cross_entropy",
        lam: float = 0.0,
        inner_steps: int = 16,
        inner_lr: float = 0.1,
        inner_solver="gd",
        variant: str = "paper",
        batched: bool = True,
    ):
        super().__init__(
            model=model,
            loss=loss,
            lam=lam,
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            inner_solver=inner_solver,
            variant=variant,
            batched=batched,
        )

    def task_meta_grad(self, theta, sx, sy, qx, qy):
        phi = self.adapt(theta, sx, sy)
        g = {k: theta[k] - phi[k] for k in theta}
        stats = self.query_stats(phi, sx, sy, qx, qy)
        stats["inner_grad_norm"] = self.inner_grad_norm(theta, phi, sx, sy)
        return g, stats
