"""First-order MAML: the query gradient at the adapted parameters, ∇L(φ)."""

from __future__ import annotations

from torch.func import grad

from .base import MetaAlgorithm


class FOMAML(MetaAlgorithm):
    """First-order MAML: g = ∇L(φ), i.e. dφ/dθ replaced by I. It is also the λ → ∞ limit of
    iMAML's meta-gradient at a fixed φ. ``lam`` = 0 (default) is the original inner loop."""

    name = "fomaml"

    def task_meta_grad(self, theta, sx, sy, qx, qy):
        phi, info = self.adapt_with_info(theta, sx, sy)
        g = grad(self.loss_of(qx, qy))(phi)
        stats = self.query_stats(phi, sx, sy, qx, qy)
        stats.update(self.inner_stats(theta, phi, sx, sy, info))
        return g, stats
