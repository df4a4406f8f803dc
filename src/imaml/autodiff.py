"""Hessian-vector products of a scalar function of a parameter dict, with torch.func.

``linearize_grad(f, params)`` returns ∇f(params) and the map v ↦ ∇²f(params)·v (and
f(params) with ``with_value=True``, from the same forward pass). In the
default reverse-over-reverse mode the gradient's graph is built once and each product
is one more backward pass through it (``torch.func.vjp`` of ``torch.func.grad``), so a
solver running k steps pays one forward + gradient, then k double-backward passes.
Forward-over-reverse (``jvp`` of ``grad``) recomputes the gradient at every product.
Both run under ``torch.func.vmap``; ``benchmarks/hvp_modes.py`` measures them.

``linearize_ggn(outputs, loss, params)`` gives the same triple for f = loss ∘ outputs with
the generalised Gauss–Newton matrix G = Jᵀ·∇²loss(z)·J (J the Jacobian of the outputs z)
in place of ∇²f: G is positive semi-definite whenever the loss is convex in the outputs
(cross-entropy on logits, squared error), so I + G/λ is positive definite and CG is sound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jvp, vjp

from .checks import check_choice
from .params import Params

HVP_MODES = ("rev", "fwd")
CURVATURES = ("hessian", "ggn")


class SplitLoss(NamedTuple):
    """A scalar function of parameters written as ``loss(outputs(params))``: what the
    Gauss–Newton curvature needs (the network's outputs apart from the loss on them)."""

    outputs: Callable[[Params], Tensor]
    loss: Callable[[Tensor], Tensor]

    def __call__(self, params: Params) -> Tensor:
        return self.loss(self.outputs(params))


def in_transform(t: Tensor) -> bool:
    """True inside a torch.func transform (vmap, grad), where a tensor's values cannot be read."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def linearize_grad(
    f: Callable[[Params], Tensor], params: Params, *, mode: str = "rev", with_value: bool = False
) -> tuple[Params, Callable[[Params], Params]] | tuple[Params, Callable[[Params], Params], Tensor]:
    """Return (∇f(params), v ↦ ∇²f(params)·v), and f(params) third with ``with_value``."""
    if mode == "rev":
        # ∇²f is symmetric, so the vector-Jacobian product of ∇f is the HVP.
        g, vjp_fn, value = vjp(grad_and_value(f), params, has_aux=True)
        out = (g, lambda v: vjp_fn(v)[0])
    elif mode == "fwd":
        g, value = grad_and_value(f)(params)
        out = (g, lambda v: jvp(grad(f), (params,), (v,))[1])
    else:
        raise ValueError(f"unknown HVP mode {mode!r}; choose one of {', '.join(HVP_MODES)}")
    return (*out, value) if with_value else out


def linearize_ggn(
    outputs: Callable[[Params], Tensor],
    loss: Callable[[Tensor], Tensor],
    params: Params,
    *,
    with_value: bool = False,
):
    """Return (∇f(params), v ↦ Jᵀ·∇²loss(z)·J·v), and f(params) third with ``with_value``,
    for f = loss ∘ outputs, z = outputs(params), J = ∂z/∂params. The backward pass through
    the outputs is built once; each product adds one forward-mode pass (J·v), a product
    with the loss's small Hessian in z, and one backward pass (Jᵀ·u)."""
    z, pullback = vjp(outputs, params)
    dz, value = grad_and_value(loss)(z)
    g = pullback(dz)[0]

    def ggn(v: Params) -> Params:
        Jv = jvp(outputs, (params,), (v,))[1]
        HJv = jvp(grad(loss), (z,), (Jv,))[1]
        return pullback(HJv)[0]

    return (g, ggn, value) if with_value else (g, ggn)


def linearize_curvature(
    f: Callable[[Params], Tensor],
    params: Params,
    *,
    curvature: str = "hessian",
    mode: str = "rev",
    with_value: bool = False,
):
    """``linearize_grad`` (curvature "hessian") or ``linearize_ggn`` (curvature "ggn", which
    needs ``f`` as a ``SplitLoss``): (∇f, v ↦ C·v) and f third with ``with_value``."""
    if curvature == "hessian":
        return linearize_grad(f, params, mode=mode, with_value=with_value)
    check_choice("curvature", curvature, CURVATURES)
    if not isinstance(f, SplitLoss):
        raise ValueError(
            "curvature='ggn' needs the loss split into network outputs and a loss on them: "
            "pass imaml.autodiff.SplitLoss(outputs, loss)"
        )
    return linearize_ggn(f.outputs, f.loss, params, with_value=with_value)


def hvp(f: Callable[[Params], Tensor], params: Params, v: Params, *, mode: str = "rev") -> Params:
    """∇²f(params)·v."""
    return linearize_grad(f, params, mode=mode)[1](v)
