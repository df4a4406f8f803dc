"""Parameter dicts: ``Params = dict[str, Tensor]`` and the few operations the math needs.

Every function here is pure and works unchanged under ``torch.func.vmap`` (a leading
task dimension is invisible to it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

Params = dict[str, Tensor]


def tree_map(fn: Callable[..., Tensor], first: Mapping[str, Tensor], *rest: Mapping[str, Tensor]):
    """Apply ``fn`` key by key to one or more dicts with the same keys."""
    return {k: fn(first[k], *(r[k] for r in rest)) for k in first}


def add(a: Params, b: Params, alpha: float | Tensor = 1.0) -> Params:
    """a + alpha·b."""
    return {k: a[k] + alpha * b[k] for k in a}


def sub(a: Params, b: Params) -> Params:
    return {k: a[k] - b[k] for k in a}


def scale(a: Params, s: float | Tensor) -> Params:
    return {k: s * a[k] for k in a}


def dot(a: Params, b: Params) -> Tensor:
    """Σ_k ⟨a_k, b_k⟩ as a 0-dim tensor."""
    return sum((a[k] * b[k]).sum() for k in a)


def norm(a: Params) -> Tensor:
    return torch.sqrt(dot(a, a))


def zeros_like(a: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def detach(a: Mapping[str, Tensor]) -> Params:
    return {k: v.detach() for k, v in a.items()}


def ravel(a: Params, *, batch_dims: int = 0) -> tuple[Tensor, Callable[[Tensor], Params]]:
    """Flatten a dict into one vector; return it with the inverse map.

    With ``batch_dims = d`` the first d dimensions (shared by every tensor, e.g. the task
    dimension T) are kept: a dict of (T, *shape) tensors becomes one (T, n) tensor.
    The inverse splits the last dimension and keeps any leading ones (a stack of vectors
    of shape (T, n) becomes a dict of (T, *shape) tensors); its pieces are views."""
    keys = list(a)
    lead = a[keys[0]].shape[:batch_dims] if keys else ()
    shapes = [a[k].shape[batch_dims:] for k in keys]
    sizes = [math.prod(s) for s in shapes]
    flat = torch.cat([a[k].reshape(*lead, -1) for k in keys], -1) if keys else torch.zeros(0)

    def unravel(v: Tensor) -> Params:
        lead = v.shape[:-1]
        parts = torch.split(v, sizes, dim=-1)
        return {k: p.reshape(lead + s) for k, p, s in zip(keys, parts, shapes, strict=True)}

    return flat, unravel


def check_same_structure(a: Mapping[str, Tensor], b: Mapping[str, Tensor], names=("a", "b")):
    """Raise ValueError unless ``a`` and ``b`` have the same keys and shapes."""
    if set(a) != set(b):
        only_a = sorted(set(a) - set(b))
        only_b = sorted(set(b) - set(a))
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same keys; "
            f"only in {names[0]}: {only_a}, only in {names[1]}: {only_b}"
        )
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(
                f"{names[0]}[{k!r}] has shape {tuple(a[k].shape)} but "
                f"{names[1]}[{k!r}] has shape {tuple(b[k].shape)}"
            )
