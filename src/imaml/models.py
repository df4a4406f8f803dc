"""Networks of the paper, used functionally through ``torch.func.functional_call``.

BatchNorm layers keep no running statistics (``track_running_stats=False``): every
forward pass normalises with the statistics of its own batch, i.e. of one task's
support or query set, in training and in evaluation alike. This is what the authors'
code and the MAML protocol do, and it is what makes ``vmap`` over tasks exact (no
buffers are shared between tasks).

The convolutions are the backend's (cuDNN, oneDNN; under ``vmap`` over tasks a grouped
convolution with one group per task). Other ways of computing them (im2col by
``F.unfold``, im2col from strided slices) were slower on every machine measured; they
live in benchmarks/conv_variants.py with their numbers in docs/performance-cpu.md and
docs/performance-gpu.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _init_paper_(module: nn.Module, generator: torch.Generator | None) -> None:
    """Xavier-uniform weights with gain 1.73 and biases uniform in [0, 0.05] (docs/paper.md)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            fan_out = m.weight.shape[0] * math.prod(m.weight.shape[2:])
            fan_in = m.weight.shape[1] * math.prod(m.weight.shape[2:])
            bound = 1.73 * math.sqrt(6.0 / (fan_in + fan_out))
            with torch.no_grad():
                m.weight.uniform_(-bound, bound, generator=generator)
                if m.bias is not None:
                    m.bias.uniform_(0.0, 0.05, generator=generator)


class OmniglotConvNet(nn.Module):
    """The paper's Omniglot network.

    4 × [conv 3×3 stride 2 padding 1 → BatchNorm (batch statistics) → ReLU], with a
    zero pad (right and bottom by 1) after block 2: 28 → 14 → 7 → 8 → 4 → 2, then
    flatten (2·2·channels) → linear to ``n_way`` logits. Input (B, 1, 28, 28).
    """

    def __init__(self, n_way: int, *, channels: int = 64, generator: torch.Generator | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for block in range(4):
            layers += [
                nn.Conv2d(c_in, channels, 3, stride=2, padding=1),
                nn.BatchNorm2d(channels, track_running_stats=False),
                nn.ReLU(),
            ]
            if block == 1:
                layers.append(nn.ZeroPad2d((0, 1, 0, 1)))
            c_in = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * 2 * channels, n_way)
        _init_paper_(self, generator)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class MiniImagenetConvNet(nn.Module):
    """The standard Mini-ImageNet conv4: 4 × [conv 3×3 pad 1 → BatchNorm → ReLU → max-pool 2×2].

    84 → 42 → 21 → 10 → 5, flatten (5·5·channels) → linear. Input (B, 3, 84, 84).
    """

    def __init__(self, n_way: int, *, channels: int = 32, generator: torch.Generator | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for _ in range(4):
            layers += [
                nn.Conv2d(c_in, channels, 3, padding=1),
                nn.BatchNorm2d(channels, track_running_stats=False),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(5 * 5 * channels, n_way)
        _init_paper_(self, generator)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class MLP(nn.Module):
    """Fully connected ReLU network; the sinusoid model is ``MLP((1, 40, 40, 1))``."""

    def __init__(self, sizes=(1, 40, 40, 1), *, generator: torch.Generator | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        if generator is not None:
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    bound = 1.0 / math.sqrt(m.in_features)
                    with torch.no_grad():
                        m.weight.uniform_(-bound, bound, generator=generator)
                        m.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Linear(nn.Module):
    """y = x·w (no bias): the linear-in-parameters model of the Figure 2(a) problem."""

    def __init__(self, dim: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.w


def cross_entropy(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and accuracy of logits ``output`` (B, N) for labels (B,)."""
    loss = nn.functional.cross_entropy(output, target)
    accuracy = (output.argmax(-1) == target).to(output.dtype).mean()
    return loss, accuracy


def mse(output: Tensor, target: Tensor) -> tuple[Tensor, None]:
    """Mean squared error (the sinusoid loss); no accuracy.

    Written out rather than ``F.mse_loss``, whose backward fails under forward-mode AD
    ("ZeroTensors are immutable", torch 2.13), i.e. in forward-over-reverse HVPs."""
    return ((output - target) ** 2).mean(), None


def half_sse(output: Tensor, target: Tensor) -> tuple[Tensor, None]:
    """½·mean squared error, the quadratic of the Figure 2(a) problem."""
    return 0.5 * ((output - target) ** 2).sum(-1).mean(), None


LOSSES = {"cross_entropy": cross_entropy, "mse": mse, "half_sse": half_sse}
