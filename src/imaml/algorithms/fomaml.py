"""First-order MAML: the query gradient at the adapted parameters, ∇L(φ)."""

from __future__ import annotations

from torch.func import grad

from .base import MetaAlgorithm


class FOMAML(MetaAlgorithm):
    """First-order MAML: g = ∇L(φ), i.e. dφ/dθ replaced by I. It is also the λ → ∞ limit of
    iMAML's meta-gradient at a fixed φ. ``lam`` = 0 (default) is the original inner loop."""

    name = "fomaml"

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
        g = grad(self.loss_of(qx, qy))(phi)
        stats = self.query_stats(phi, sx, sy, qx, qy)
        stats["inner_grad_norm"] = self.inner_grad_norm(theta, phi, sx, sy)
        return g, stats
