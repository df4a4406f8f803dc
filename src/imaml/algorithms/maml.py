"""MAML: the exact gradient of L(φ_K(θ)) by backpropagation through the K inner steps."""

from __future__ import annotations

from torch.func import grad

from .base import MetaAlgorithm


class MAML(MetaAlgorithm):
    """MAML (Finn et al. 2017). ``lam`` = 0 (default) is the original inner loop on L̂;
    λ > 0 differentiates through the proximal inner loop of iMAML instead. Memory grows
    linearly with ``inner_steps`` (the unrolled graph is kept)."""

    name = "maml"

    def task_meta_grad(self, theta, sx, sy, qx, qy):
        def outer(th):
            phi, info = self.adapt_with_info(th, sx, sy)
            q_loss, _ = self.loss_and_metric(phi, qx, qy)
            return q_loss, (phi, info)

        g, (phi, info) = grad(outer, has_aux=True)(theta)
        stats = self.query_stats(phi, sx, sy, qx, qy)
        stats.update(self.inner_stats(theta, phi, sx, sy, info))
        return g, stats
