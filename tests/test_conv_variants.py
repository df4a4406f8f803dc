"""The speed benchmarks' other convolutions (benchmarks/conv_variants.py): im2col + matrix
product (``impl="unfold"``, ``impl="slices"``) is the backend's convolution, to every order
of derivative the algorithms take, under vmap over tasks."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from imaml import make_algorithm
from imaml.models import MiniImagenetConvNet

from conftest import conv_setup, rel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from conv_variants import Conv2d, conv2d_slices, conv2d_unfold, set_conv_impl  # noqa: E402


@pytest.mark.parametrize(
    ("c_in", "size", "stride", "padding", "bias"),
    [(1, 28, 2, 1, True), (4, 7, 2, 1, True), (3, 9, 1, 1, False), (2, 8, (2, 1), (0, 1), True)],
)
@pytest.mark.parametrize("conv", [conv2d_unfold, conv2d_slices])
def test_im2col_convolutions_equal_conv2d_in_float64(conv, c_in, size, stride, padding, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, c_in, size, size + 1, generator=g, dtype=torch.float64)
    w = torch.randn(5, c_in, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64) if bias else None
    pair = lambda v: (v, v) if isinstance(v, int) else v
    ours = conv(x, w, b, stride=pair(stride), padding=pair(padding))
    ref = F.conv2d(x, w, b, stride=stride, padding=padding)
    assert ours.shape == ref.shape
    assert rel(ours, ref) < 1e-14


@pytest.mark.parametrize("impl", ["unfold", "slices"])
@pytest.mark.parametrize(
    ("algo", "kw"),
    [
        ("imaml", {"flat": True}),
        ("imaml", {"flat": False, "hvp_mode": "fwd"}),
        ("maml", {}),
        ("fomaml", {}),
    ],
)
def test_meta_gradient_with_im2col_convolutions_equals_native_in_float64(f64, algo, kw, impl):
    # the inner loop's gradients, the HVPs (reverse and forward over reverse) and MAML's
    # backprop through the loop (third-order terms of the convolution) all go through it
    model, theta, batch = conv_setup(torch.float64, T=3, channels=4)
    alg = make_algorithm(algo, model=model, inner_steps=3, **kw)
    ref, ref_stats = alg.meta_grad(theta, batch)
    set_conv_impl(model, impl)
    ours, stats = alg.meta_grad(theta, batch)
    assert rel(ours, ref) < 1e-12
    assert torch.allclose(stats["query_loss"], ref_stats["query_loss"], rtol=1e-12)


@pytest.mark.parametrize("impl", ["unfold", "slices"])
def test_set_conv_impl_sets_every_convolution_and_keeps_the_state_dict(impl):
    model = MiniImagenetConvNet(5, channels=4)
    keys = list(model.state_dict())
    set_conv_impl(model, impl)
    convs = [m for m in model.modules() if isinstance(m, Conv2d)]
    assert len(convs) == 4 and all(m.impl == impl for m in convs)
    assert list(model.state_dict()) == keys
    x = torch.rand(2, 3, 84, 84)
    out = model(x)
    set_conv_impl(model, "native")
    assert torch.allclose(out, model(x), atol=1e-5)


def test_set_conv_impl_rejects_what_it_cannot_compute():
    model, _, _ = conv_setup()
    with pytest.raises(ValueError, match="conv impl must be one of"):
        set_conv_impl(model, "winograd")
    grouped = torch.nn.Sequential(Conv2d(4, 4, 3, groups=2))
    for impl in ("unfold", "slices", "slices-first"):
        with pytest.raises(ValueError, match="convolution has no groups"):
            set_conv_impl(grouped, impl)
    assert grouped[0].impl == "native"


def test_first_layer_choice_sets_the_first_convolution_only():
    model = MiniImagenetConvNet(5, channels=4)
    set_conv_impl(model, "slices")
    set_conv_impl(model, "slices-first")  # the others go back to native
    assert [m.impl for m in model.modules() if isinstance(m, Conv2d)] == ["slices"] + ["native"] * 3
    x = torch.rand(2, 3, 84, 84)
    out = model(x)
    set_conv_impl(model, "native")
    assert torch.allclose(out, model(x), atol=1e-5)


def test_compiled_batched_gradient_with_slices_convolutions_equals_native_in_float64(f64):
    # what the compiled pieces on CUDA may run with: inductor fuses the slices of the
    # omniglot network's stride-2 convolutions (and the zero pad) into its own kernels; an
    # inner step's per-task gradient through them, compiled whole, is the native one
    from torch.func import functional_call, grad, vmap

    model, theta, batch = conv_setup(torch.float64, T=2, channels=4)

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    per_task = vmap(grad(loss), in_dims=(None, 0, 0))
    ref = per_task(theta, batch.support_x, batch.support_y)
    set_conv_impl(model, "slices")
    ours = torch.compile(per_task, fullgraph=True)(theta, batch.support_x, batch.support_y)
    assert rel(ours, ref) < 1e-12
