"""Data-parallel meta-training over processes with torch.distributed (launched by torchrun).

Every rank draws the same meta-batch from the same seeded generator and takes its
contiguous share of the tasks (shares differ by at most one task when the meta-batch
does not divide evenly). Each rank computes the mean meta-gradient of its kept tasks;
the global mean is Σ_r n_r·ḡ_r / Σ_r n_r, formed by one all-reduce, so every rank takes
the same outer step and holds the same parameters, and the tasks seen at a step are
exactly those a single process would see. Backend: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .algorithms.base import TaskBatch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (sizes differ by at most one)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag OR-ed over all ranks."""
        if not self.enabled:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([float(f) for f in flags])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def take(self, batch: TaskBatch) -> TaskBatch:
        s = self.shard(batch.num_tasks)
        return TaskBatch(*(t[s] for t in batch))


def from_env(device: torch.device, *, timeout_s: float = 300.0) -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as e:  # a rendezvous that cannot complete
            raise ValueError(f"could not join the process group ({backend}): {e}") from e
    return Dist(rank=dist.get_rank(), world=dist.get_world_size())


def device_for(name: str) -> str:
    """With several ranks on CUDA, rank r uses cuda:LOCAL_RANK."""
    if (
        name in ("auto", "cuda")
        and torch.cuda.is_available()
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
    ):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return name


def mean_over_ranks(
    d: Dist, grads: dict[str, torch.Tensor], skipped: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Σ_r kept_r·grads_r / Σ_r kept_r over all ranks, kept_r the number of this rank's
    tasks not ``skipped`` (identity for one process, with no host-device synchronisation)."""
    if not d.enabled:
        return grads
    kept = int((~skipped).sum())
    keys = list(grads)
    ref = grads[keys[0]]
    flat = torch.cat(
        [grads[k].reshape(-1) * kept for k in keys]
        + [torch.tensor([float(kept)], dtype=ref.dtype, device=ref.device)]
    )
    dist.all_reduce(flat)
    total = flat[-1]
    if total == 0:
        raise ValueError(
            "every task of the meta-batch gave a non-finite loss or meta-gradient on every rank"
        )
    out, i = {}, 0
    for k in keys:
        n = grads[k].numel()
        out[k] = (flat[i : i + n] / total).reshape(grads[k].shape)
        i += n
    return out


def gather_tasks(d: Dist, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate per-task tensors of every rank, in rank order (the single-process order)."""
    if not d.enabled:
        return values
    parts: list = [None] * d.world
    dist.all_gather_object(parts, {k: v.detach().cpu() for k, v in values.items()})
    return {k: torch.cat([p[k] for p in parts]) for k in values}


def close(d: Dist, *, clean: bool = True) -> None:
    """Leave the process group; after a success, first wait for every rank (a rank that
    tears down while another still talks to it can abort gloo)."""
    if d.enabled and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
