"""Networks of the paper, used functionally through ``torch.func.functional_call``.

BatchNorm layers keep no running statistics (``track_running_stats=False``): every
forward pass normalises with the statistics of its own batch, i.e. of one task's
support or query set, in training and in evaluation alike. This is what the authors'
code and the MAML protocol do, and it is what makes ``vmap`` over tasks exact (no
buffers are shared between tasks).

The convolutions are ``Conv2d``: ``nn.Conv2d`` with a choice of how the convolution is
computed (``impl``, set for a whole network by ``set_conv_impl``; same parameters, same
math): ``"native"`` calls the backend's convolution (cuDNN, oneDNN), which under ``vmap``
over tasks is a grouped convolution with one group per task; ``"unfold"`` is im2col
(``F.unfold``) and a batched matrix product, which replaces cuDNN's grouped kernels by
cuBLAS batched GEMMs. The networks are built ``native``: on an H200 the unfolded
meta-step was 2.6× slower (``F.unfold``'s CUDA kernel is launched once per image,
thousands of launches per meta-step; benchmarks/gpu_step.py, README), and on 2 CPU cores
im2col + matrix products were 2–3× slower than oneDNN's grouped convolution. ``unfold``
is kept so that the benchmark can be rerun on other hardware. ``"slices"`` is im2col too,
built from ``kh·kw`` strided slices of the padded input and one matrix product per batch
(per task under ``vmap``): every part of it, and of its derivatives, is indexing,
padding or a matrix product, which ``torch.compile`` fuses into a few kernels, where
cuDNN's grouped convolutions transpose to NHWC and back around every call and
``F.unfold`` launches per image. On an H200 the compiled omniglot-5w1s meta-step was
nevertheless slower with it, 20.0 ms (18.4 with the first layer only) against 15.6 ms
native (its products in full float32, cuDNN's in TF32; benchmarks/gpu_step.py
``--compile-conv slices``, README), and on 2 CPU cores 1.45 against 1.09 s at the peer
setting (docs/results/cpu_slices.json).
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


CONV_IMPLS = ("native", "unfold", "slices")


def conv2d_unfold(x: Tensor, weight: Tensor, bias: Tensor | None, *, stride, padding) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` as im2col and a matrix product.

    x (N, C, H, W), weight (O, C, kh, kw); no dilation or groups. Differentiable to any
    order and batched by ``vmap`` like its parts (``F.unfold``, ``torch.matmul``).
    """
    n, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    (sh, sw), (ph, pw) = stride, padding
    cols = nn.functional.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw))  # N, C·kh·kw, L
    out = torch.matmul(weight.reshape(o, -1), cols)  # N, O, L
    out = out.view(n, o, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)
    return out if bias is None else out + bias.view(1, o, 1, 1)


def conv2d_slices(x: Tensor, weight: Tensor, bias: Tensor | None, *, stride, padding) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` as im2col from strided slices.

    x (N, C, H, W), weight (O, C, kh, kw); no dilation or groups. The columns are the
    ``kh·kw`` shifted, strided slices of the zero-padded input, laid out (N·Ho·Wo, C·kh·kw)
    so that one matrix product with the flattened weight gives every output position (for
    an input of at most 3 channels, a multiply-sum over its few taps instead); the result
    is copied from (N, Ho, Wo, O) to NCHW. Slicing, padding and the matrix product
    have batching rules to every order of derivative, so ``vmap`` over tasks makes it one
    batched matrix product per layer.
    """
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    (sh, sw), (ph, pw) = stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    xp = nn.functional.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)  # N, H + 2ph, W + 2pw, C
    taps = [
        xp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    cols = torch.stack(taps, dim=-1).reshape(n * ho * wo, c * kh * kw)  # (c, i, j) order
    w2d = weight.reshape(o, c * kh * kw)
    if c <= 3:  # an image's channels: a multiply-sum over the few taps (N·Ho·Wo, O)
        # inductor fuses it; and the matrix product failed to compile in a forward-over-
        # reverse product (torch 2.13: "Tensor device mismatch") where the input carries
        # no derivative and the weights are views of one flat vector (--flat)
        out = (cols.unsqueeze(-1) * w2d.t()).sum(-2)
    else:
        out = torch.matmul(cols, w2d.t())  # N·Ho·Wo, O
    out = out.view(n, ho, wo, o).permute(0, 3, 1, 2)
    # NCHW in memory: cuDNN's batch norm clones a channels-last input as channels-last,
    # which vmap does not support (torch 2.11, CUDA)
    return (out if bias is None else out + bias.view(1, o, 1, 1)).contiguous()


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` computed by ``impl`` (see the module docstring); state dicts unchanged."""

    impl = "native"

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.impl == "native":
            return super()._conv_forward(x, weight, bias)
        conv = conv2d_unfold if self.impl == "unfold" else conv2d_slices
        return conv(x, weight, bias, stride=self.stride, padding=self.padding)


# a network's choice: every convolution one way, or only the first layer (``-first``;
# with one input channel, vmap's grouped convolution is a depthwise one) and the rest native
CONV_CHOICES = (*CONV_IMPLS, "unfold-first", "slices-first")


def set_conv_impl(model: nn.Module, impl: str) -> nn.Module:
    """Compute every ``Conv2d`` of ``model`` with ``impl`` (one of ``CONV_IMPLS``), or only
    the first with ``"unfold-first"`` / ``"slices-first"`` and the others natively."""
    if impl not in CONV_CHOICES:
        raise ValueError(f"conv impl must be one of {CONV_CHOICES}, got {impl!r}")
    first = impl.endswith("-first")
    impl = impl.removesuffix("-first")
    convs = [m for m in model.modules() if isinstance(m, Conv2d)]
    chosen = convs[:1] if first else convs
    for m in chosen if impl != "native" else []:
        plain = m.groups == 1 and m.dilation == (1, 1) and m.padding_mode == "zeros"
        if not plain or isinstance(m.padding, str):
            raise ValueError(f"the {impl} convolution has no groups or dilation: {m}")
    for m in convs:
        m.impl = impl if m in chosen else "native"
    return model


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
                Conv2d(c_in, channels, 3, stride=2, padding=1),
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
                Conv2d(c_in, channels, 3, padding=1),
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
