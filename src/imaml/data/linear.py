"""Linear-in-parameters regression with a chosen condition number (the paper's Figure 2(a)).

Task i: support features X_s (n × d) built so that A_s = X_sᵀX_s/n has eigenvalues
log-spaced in [1/κ, 1] (κ = ``condition_number``) in a random basis; targets
y = X·w_i + noise with w_i ~ N(w̄, I). With L̂(φ) = ½·mean((X_sφ − y_s)²) and the query
loss L likewise, the inner problem has the closed-form solution

    φ*(θ) = (A_s + λI)⁻¹(c_s + λθ),  c_s = X_sᵀy_s/n,

and the exact meta-gradient is  dL(φ*)/dθ = (I + A_s/λ)⁻¹ ∇L(φ*)  (``exact_meta_grad``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..algorithms.base import TaskBatch
from ..models import Linear


class LinearRegressionTasks:
    loss = "half_sse"
    metric = "half_sse"

    def __init__(
        self,
        *,
        dim: int = 10,
        n_support: int = 20,
        n_query: int = 20,
        condition_number: float = 100.0,
        noise: float = 0.1,
        seed: int = 0,
    ):
        if n_support < dim:
            raise ValueError(f"n_support ({n_support}) must be >= dim ({dim})")
        if not condition_number >= 1:
            raise ValueError(f"condition_number must be >= 1, got {condition_number!r}")
        self.dim, self.n_support, self.n_query = dim, n_support, n_query
        self.condition_number, self.noise = float(condition_number), noise
        g = torch.Generator().manual_seed(seed)
        self.w_mean = torch.randn(dim, 1, generator=g, dtype=torch.float64)

    def make_model(self, generator: torch.Generator | None = None):
        return Linear(self.dim)

    def _features(self, T: int, n: int, generator, dtype) -> Tensor:
        eig = torch.logspace(
            0, -torch.log10(torch.tensor(self.condition_number)).item(), self.dim, dtype=dtype
        )
        U, _ = torch.linalg.qr(torch.randn(T, n, self.dim, generator=generator, dtype=dtype))
        V, _ = torch.linalg.qr(torch.randn(T, self.dim, self.dim, generator=generator, dtype=dtype))
        # X = √n · U diag(√eig) Vᵀ, so XᵀX/n = V diag(eig) Vᵀ exactly.
        return (n**0.5) * U @ torch.diag_embed(eig.sqrt()) @ V.transpose(-1, -2)

    def sample(
        self, num_tasks: int, *, generator: torch.Generator, dtype=torch.float64
    ) -> TaskBatch:
        T = num_tasks
        w = self.w_mean.to(dtype) + torch.randn(T, self.dim, 1, generator=generator, dtype=dtype)
        xs = self._features(T, self.n_support, generator, dtype)
        xq = torch.randn(T, self.n_query, self.dim, generator=generator, dtype=dtype)
        noise = lambda n: self.noise * torch.randn(T, n, 1, generator=generator, dtype=dtype)
        return TaskBatch(xs, xs @ w + noise(self.n_support), xq, xq @ w + noise(self.n_query))


def inner_solution(theta: Tensor, xs: Tensor, ys: Tensor, *, lam: float) -> Tensor:
    """φ*(θ) = (A_s + λI)⁻¹(c_s + λθ) for one task; θ has shape (d, 1)."""
    n, d = xs.shape
    A = xs.T @ xs / n
    c = xs.T @ ys / n
    return torch.linalg.solve(A + lam * torch.eye(d, dtype=xs.dtype), c + lam * theta)


def exact_meta_grad(theta: Tensor, task: TaskBatch, *, lam: float) -> Tensor:
    """dL(φ*(θ))/dθ = (I + A_s/λ)⁻¹ ∇L(φ*) for one task (no task dimension)."""
    xs, ys, xq, yq = task
    n, d = xs.shape
    phi = inner_solution(theta, xs, ys, lam=lam)
    gq = xq.T @ (xq @ phi - yq) / xq.shape[0]
    A = xs.T @ xs / n
    return torch.linalg.solve(torch.eye(d, dtype=xs.dtype) + A / lam, gq)
