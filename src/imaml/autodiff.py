"""Hessian-vector products of a scalar function of a parameter dict, with torch.func.

``linearize_grad(f, params)`` returns ∇f(params) and the map v ↦ ∇²f(params)·v. In the
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
from torch.func import grad, jvp, vjp

from .params import Params

HVP_MODES = ("rev", "fwd")


def in_transform(t: Tensor) -> bool:
    """True inside a torch.func transform (vmap, grad), where a tensor's values cannot be read."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def linearize_grad(
    f: Callable[[Params], Tensor], params: Params, *, mode: str = "rev"
) -> tuple[Params, Callable[[Params], Params]]:
    """Return (∇f(params), v ↦ ∇²f(params)·v)."""
    if mode == "rev":
        g, vjp_fn = vjp(grad(f), params)
        # ∇²f is symmetric, so the vector-Jacobian product of ∇f is the HVP.
        return g, lambda v: vjp_fn(v)[0]
    if mode == "fwd":
        g = grad(f)(params)
        return g, lambda v: jvp(grad(f), (params,), (v,))[1]
    raise ValueError(f"unknown HVP mode {mode!r}; choose one of {', '.join(HVP_MODES)}")


def hvp(f: Callable[[Params], Tensor], params: Params, v: Params, *, mode: str = "rev") -> Params:
    """∇²f(params)·v."""
    return linearize_grad(f, params, mode=mode)[1](v)
