"""MAML: the exact gradient of L(φ_K(θ)) by backpropagation through the K inner steps."""

from __future__ import annotations

from torch.func import grad

from .base import MetaAlgorithm


class MAML(MetaAlgorithm):
    """MAML (Finn et al. 2017). ``lam`` = 0 (default) is the original inner loop on L̂;
    λ > 0 differentiates through the proximal inner loop of iMAML instead. Memory grows
    linearly with ``inner_steps`` (the unrolled graph is kept)."""

    name = "maml"

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
        def outer(th):
            phi = self.adapt(th, sx, sy)
            q_loss, _ = self.loss_and_metric(phi, qx, qy)
            return q_loss, phi

        g, phi = grad(outer, has_aux=True)(theta)
        stats = self.query_stats(phi, sx, sy, qx, qy)
        stats["inner_grad_norm"] = self.inner_grad_norm(theta, phi, sx, sy)
        return g, stats
