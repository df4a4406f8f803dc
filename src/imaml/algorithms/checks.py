"""What the algorithms check at the API boundary, and how they treat ordinary layers.

Each check raises ValueError in one line that names the argument and the fix: a
mistake here would otherwise give a silently wrong meta-gradient (a params dict whose
keys miss the model's falls back to the module's own weights; one task without its task
dimension is read as many one-example tasks) or a deep torch.func traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..models import LOSSES


def loss_function(loss) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]:
    """``(outputs, targets) -> (loss, metric or None)`` for a loss name in ``LOSSES`` or a
    callable of one's own: ``loss(outputs, targets)`` returning a scalar tensor, or a pair
    (scalar loss, scalar accuracy) to have the accuracy reported (``query_accuracy``)."""
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(
                f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)} or pass a callable "
                "loss(outputs, targets) -> scalar"
            )
        return LOSSES[loss]
    if not callable(loss):
        raise ValueError(f"loss must be a name or a callable, got {type(loss).__name__}")

    def custom(outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | None]:
        value = loss(outputs, targets)
        value, metric = value if isinstance(value, tuple) and len(value) == 2 else (value, None)
        for what, v in (("loss", value), ("accuracy", metric)):
            if v is not None and (not isinstance(v, Tensor) or v.dim() != 0):
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(
                    f"loss(outputs, targets) must return a scalar tensor (or a pair loss, "
                    f"accuracy), got {what} {got}"
                )
        return value, metric

    return custom


def constant_names(model: nn.Module) -> set[str]:
    """Names the algorithms neither adapt nor meta-train: the model's frozen parameters
    (``requires_grad=False``) and its buffers (e.g. from ``state_dict()``)."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return frozen | {n for n, _ in model.named_buffers()}


def check_params(model: nn.Module, params: dict, *, extra: Callable[[str], bool]) -> None:
    """``params`` holds the model's trainable parameters by name and nothing unknown
    (``extra(key)``: a meta-parameter of the algorithm's own, e.g. a learned log λ)."""
    if not isinstance(params, dict) or not params:
        raise ValueError(
            "params must be a non-empty dict name -> tensor (dict(model.named_parameters()))"
        )
    known = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    unknown = sorted(k for k in params if k not in known and not extra(k))
    if unknown:
        raise ValueError(
            f"params has keys the model does not: {unknown[:4]}; pass dict(model.named_parameters())"
        )
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in params)
    if missing:
        raise ValueError(
            f"params lacks the model's parameters {missing[:4]} (they would stay fixed at the "
            "module's values); pass dict(model.named_parameters())"
        )


def input_rank(model: nn.Module) -> int | None:
    """The rank of one batch of inputs for ``model``, from its first convolution or linear
    layer (4 for Conv2d: N×C×H×W; at least 2 for Linear), or None if it cannot be told."""
    for m in model.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            return m.weight.dim()  # (N, C, *spatial) has the weight's rank
        if isinstance(m, nn.Linear):
            return 2
    return None


def check_batch(model: nn.Module, batch, params: dict) -> None:
    """Every field with the same number of tasks (≥ 1), examples on both sides, a task
    dimension, and the parameters' floating-point type."""
    names = ("support_x", "support_y", "query_x", "query_y")
    if len(batch) != 4 or not all(isinstance(t, Tensor) for t in batch):
        raise ValueError(
            "batch must be a TaskBatch(support_x, support_y, query_x, query_y) of tensors"
        )
    for name, t in zip(names, batch, strict=True):
        if t.dim() < 2:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; every field needs a task dimension and an "
                "example dimension (T, n, ...): for one task add the task dimension (x[None])"
            )
    counts = {name: t.shape[0] for name, t in zip(names, batch, strict=True)}
    if len(set(counts.values())) > 1:
        raise ValueError(f"the batch's fields hold different numbers of tasks: {counts}")
    if counts["support_x"] == 0:
        raise ValueError("the batch has no tasks (task dimension 0)")
    for side in ("support", "query"):
        x, y = batch[names.index(f"{side}_x")], batch[names.index(f"{side}_y")]
        if x.shape[1] == 0:
            raise ValueError(
                f"{side}_x has no examples (shape {tuple(x.shape)}): every task needs at least "
                f"one {side} example"
            )
        if x.shape[1] != y.shape[1]:
            raise ValueError(
                f"{side}_x has {x.shape[1]} examples per task but {side}_y has {y.shape[1]}"
            )
    rank = input_rank(model)
    x = batch[0]
    if rank is not None and x.dim() <= rank:
        raise ValueError(
            f"support_x has shape {tuple(x.shape)}, the rank of one batch for this model: add "
            "the task dimension (a TaskBatch holds T tasks; for one task use x[None])"
        )
    floats = {v.dtype for v in params.values() if v.is_floating_point()}
    if x.is_floating_point() and floats and x.dtype not in floats:
        raise ValueError(
            f"the parameters are {sorted(map(str, floats))[0]} but support_x is {x.dtype}; "
            "convert one to the other (e.g. x.to(dtype))"
        )


def tracking_batchnorms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def batch_statistics(modules: list[_BatchNorm]) -> Iterator[None]:
    """BatchNorm layers that keep running statistics normalise with the batch's own
    statistics inside an algorithm (one task's support or query set, as the paper's
    networks do), and their running statistics are neither read nor updated."""
    saved = [(m.training, m.track_running_stats) for m in modules]
    try:
        for m in modules:
            m.training, m.track_running_stats = True, False
        yield
    finally:
        for m, (training, track) in zip(modules, saved, strict=True):
            m.training, m.track_running_stats = training, track


__all__ = [
    "batch_statistics",
    "check_batch",
    "check_params",
    "constant_names",
    "input_rank",
    "loss_function",
    "tracking_batchnorms",
]
