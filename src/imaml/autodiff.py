"""Hessian-vector products of a scalar function of a parameter dict, with torch.func.

``linearize_grad(f, params)`` returns ∇f(params) and the map v ↦ ∇²f(params)·v (and
f(params) with ``with_value=True``, from the same forward pass). In the
default reverse-over-reverse mode the gradient's graph is built once and each product
is one more backward pass through it (``torch.func.vjp`` of ``torch.func.grad``), so a
solver running k steps pays one forward + gradient, then k double-backward passes.
Forward-over-reverse (``jvp`` of ``grad``) recomputes the gradient at every product.
Both run under ``torch.func.vmap``; ``benchmarks/hvp_modes.py`` measures them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jvp, vjp

from .params import Params

HVP_MODES = ("rev", "fwd")


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


def hvp(f: Callable[[Params], Tensor], params: Params, v: Params, *, mode: str = "rev") -> Params:
    """∇²f(params)·v."""
    return linearize_grad(f, params, mode=mode)[1](v)
