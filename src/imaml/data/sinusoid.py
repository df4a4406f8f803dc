"""Sinusoid regression (Finn et al. 2017): y = A·sin(x − b), A ~ U[0.1, 5], b ~ U[0, π], x ~ U[−5, 5]."""

from __future__ import annotations

import math

import torch

from ..algorithms.base import TaskBatch
from ..models import MLP


class SinusoidTasks:
    loss = "mse"
    metric = "mse"

    def __init__(
        self,
        *,
        k_shot: int = 10,
        k_query: int = 10,
        amplitude=(0.1, 5.0),
        phase=(0.0, math.pi),
        x_range=(-5.0, 5.0),
    ):
        if not (
            isinstance(k_shot, int) and k_shot >= 1 and isinstance(k_query, int) and k_query >= 1
        ):
            raise ValueError(
                f"k_shot and k_query must be integers >= 1, got {k_shot!r}, {k_query!r}"
            )
        self.k_shot, self.k_query = k_shot, k_query
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    def make_model(self, generator: torch.Generator | None = None):
        return MLP((1, 40, 40, 1), generator=generator)

    def sample(
        self, num_tasks: int, *, generator: torch.Generator, dtype=torch.float32
    ) -> TaskBatch:
        T, n = num_tasks, self.k_shot + self.k_query
        u = lambda lo_hi, *shape: (
            lo_hi[0] + (lo_hi[1] - lo_hi[0]) * torch.rand(*shape, generator=generator, dtype=dtype)
        )
        amp, ph = u(self.amplitude, T, 1, 1), u(self.phase, T, 1, 1)
        x = u(self.x_range, T, n, 1)
        y = amp * torch.sin(x - ph)
        k = self.k_shot
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])
