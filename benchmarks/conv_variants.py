"""Other ways to compute the networks' convolutions, for the speed benchmarks only.

The library computes convolutions natively (cuDNN, oneDNN). These variants were measured
against it and lost everywhere (docs/performance-cpu.md, docs/performance-gpu.md): im2col
by ``F.unfold`` and a matrix product (``unfold``: 2.6× slower on an H200, 2-3× on 2 CPU
cores), and im2col from strided slices, which ``torch.compile`` fuses (``slices``: 20.0
against 15.6 ms per compiled meta-step on an H200, 1.45 against 1.09 s on 2 CPU cores).
They stay here so that the benchmarks can be rerun on other hardware; ``set_conv_impl``
switches a network's ``nn.Conv2d`` layers to one of them (same parameters, same math,
tested equal in float64, tests/test_conv_variants.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

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
    """``nn.Conv2d`` computed by ``impl`` (see the module docstring); state dicts unchanged.
    ``set_conv_impl`` turns a network's ``nn.Conv2d`` layers into these."""

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
    for m in model.modules():  # the library's plain convolutions become switchable ones
        if type(m) is nn.Conv2d:
            m.__class__ = Conv2d
    convs = [m for m in model.modules() if isinstance(m, Conv2d)]
    chosen = convs[:1] if first else convs
    for m in chosen if impl != "native" else []:
        plain = m.groups == 1 and m.dilation == (1, 1) and m.padding_mode == "zeros"
        if not plain or isinstance(m.padding, str):
            raise ValueError(f"the {impl} convolution has no groups or dilation: {m}")
    for m in convs:
        m.impl = impl if m in chosen else "native"
    return model
