"""A meta-step captured once as a CUDA graph and replayed: static inputs, the graph, its
static outputs."""

from __future__ import annotations

import torch
from torch import Tensor

from ..algorithms.base import TaskBatch
from ..params import Params

_WARMUP_STREAMS: dict[int, torch.cuda.Stream] = {}


def _warmup_stream() -> torch.cuda.Stream:
    """One side stream per device for every capture's warm-up: cuBLAS keeps a workspace per
    stream, so a new stream per capture would leave one more workspace allocated each time."""
    device = torch.cuda.current_device()
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream()
    return _WARMUP_STREAMS[device]


def signature(params: Params, batch: TaskBatch) -> tuple:
    t = [(k, tuple(v.shape), v.dtype, v.device) for k, v in params.items()]
    return tuple(t) + tuple((tuple(x.shape), x.dtype, x.device) for x in batch)


class Captured:
    """One captured graph: static inputs, the graph, and its static outputs."""

    def __init__(self, step, params: Params, batch: TaskBatch, warmup: int):
        self.params = {k: v.detach().clone() for k, v in params.items()}
        self.batch = TaskBatch(*(x.clone() for x in batch))
        side = _warmup_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # cuDNN/cuBLAS set-up and autotuning stay out of the graph
            for _ in range(warmup):
                step(self.params, self.batch)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = step(self.params, self.batch)

    def __call__(self, params: Params, batch: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        with torch.no_grad():
            for k, v in params.items():
                self.params[k].copy_(v)
            for static, x in zip(self.batch, batch, strict=True):
                static.copy_(x, non_blocking=True)
        self.graph.replay()
        mean, stats = self.out
        # the static outputs are overwritten by the next replay: hand out copies
        return {k: v.clone() for k, v in mean.items()}, {k: v.clone() for k, v in stats.items()}
