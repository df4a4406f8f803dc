"""Reptile: the meta-gradient is θ − φ."""

from __future__ import annotations

from .base import MetaAlgorithm


class Reptile(MetaAlgorithm):
    """Reptile (Nichol et al. 2018). The returned meta-gradient is g = θ − φ, unscaled:
    plain SGD with outer learning rate ε on it is Reptile's update θ ← θ + ε(φ − θ); the
    default outer optimiser (Adam) uses it as any other gradient. The query set is used
    only for the reported statistics. ``lam`` = 0 (default) is the original inner loop."""

    name = "reptile"

    def task_meta_grad(self, theta, sx, sy, qx, qy):
        phi, info = self.adapt_with_info(theta, sx, sy)
        g = {k: theta[k] - phi[k] for k in theta}
        stats = self.query_stats(phi, sx, sy, qx, qy)
        stats.update(self.inner_stats(theta, phi, sx, sy, info))
        return g, stats
