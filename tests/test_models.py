"""The networks' convolutions: im2col + matrix product (``impl="unfold"``) is the backend's
convolution, to every order of derivative the algorithms take, under vmap over tasks."""

import pytest
import torch
import torch.nn.functional as F

from imaml import make_algorithm
from imaml.models import Conv2d, MiniImagenetConvNet, conv2d_unfold, set_conv_impl

from conftest import conv_setup, rel


@pytest.mark.parametrize(
    ("c_in", "size", "stride", "padding", "bias"),
    [(1, 28, 2, 1, True), (4, 7, 2, 1, True), (3, 9, 1, 1, False), (2, 8, (2, 1), (0, 1), True)],
)
def test_unfold_convolution_equals_conv2d_in_float64(c_in, size, stride, padding, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, c_in, size, size + 1, generator=g, dtype=torch.float64)
    w = torch.randn(5, c_in, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64) if bias else None
    pair = lambda v: (v, v) if isinstance(v, int) else v
    ours = conv2d_unfold(x, w, b, stride=pair(stride), padding=pair(padding))
    ref = F.conv2d(x, w, b, stride=stride, padding=padding)
    assert ours.shape == ref.shape
    assert rel(ours, ref) < 1e-14


@pytest.mark.parametrize(
    ("algo", "kw"),
    [
        ("imaml", {"flat": True}),
        ("imaml", {"flat": False, "hvp_mode": "fwd"}),
        ("maml", {}),
        ("fomaml", {}),
    ],
)
def test_meta_gradient_with_unfold_convolutions_equals_native_in_float64(f64, algo, kw):
    # the inner loop's gradients, the HVPs (reverse and forward over reverse) and MAML's
    # backprop through the loop (third-order terms of the convolution) all go through it
    model, theta, batch = conv_setup(torch.float64, T=3, channels=4)
    alg = make_algorithm(algo, model=model, inner_steps=3, **kw)
    ref, ref_stats = alg.meta_grad(theta, batch)
    set_conv_impl(model, "unfold")
    ours, stats = alg.meta_grad(theta, batch)
    assert rel(ours, ref) < 1e-12
    assert torch.allclose(stats["query_loss"], ref_stats["query_loss"], rtol=1e-12)


def test_set_conv_impl_sets_every_convolution_and_keeps_the_state_dict():
    model = MiniImagenetConvNet(5, channels=4)
    keys = list(model.state_dict())
    set_conv_impl(model, "unfold")
    convs = [m for m in model.modules() if isinstance(m, Conv2d)]
    assert len(convs) == 4 and all(m.impl == "unfold" for m in convs)
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
    with pytest.raises(ValueError, match="no groups or dilation"):
        set_conv_impl(grouped, "unfold")
    assert grouped[0].impl == "native"
