"""Evaluation: adapt to each test task with the shared inner loop, score the query set.

The result is the mean over tasks with a 95% confidence interval 1.96·σ/√n (σ the
sample standard deviation over tasks), the protocol of the paper's tables.
"""

from __future__ import annotations

import math

import torch
from torch.func import vmap

from .algorithms.base import MetaAlgorithm
from .distributed import gather_tasks
from .params import Params


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    v = values.double()
    n = v.numel()
    if n == 0:
        raise ValueError("no tasks to evaluate")
    sd = v.std(unbiased=True).item() if n > 1 else 0.0
    return v.mean().item(), 1.96 * sd / math.sqrt(n)


def task_scores(alg: MetaAlgorithm, params: Params, batch, *, overrides: dict) -> torch.Tensor:
    """Per-task query score (accuracy for classification, else the loss) after adaptation."""
    theta = alg.pack(alg.trainable(params))

    def one(sx, sy, qx, qy):
        phi = alg.adapt(theta, sx, sy, **overrides)
        loss, metric = alg.loss_and_metric(phi, qx, qy)
        return loss if metric is None else metric

    return vmap(one, randomness="different")(*batch)


def evaluate(
    alg: MetaAlgorithm,
    params: Params,
    family,
    *,
    num_tasks: int,
    generator: torch.Generator,
    batch_size: int = 32,
    overrides: dict | None = None,
    device=None,
    dtype=torch.float32,
    progress: bool = False,
    shard=None,
) -> dict:
    """Mean score over ``num_tasks`` tasks of ``family`` with its 95% CI.

    With ``shard`` (an ``imaml.distributed.Dist``) every rank draws the same tasks, scores
    its share, and the scores are gathered: the result equals the single-process one.
    """
    from tqdm import tqdm

    overrides = overrides or {}
    scores = []
    with tqdm(
        total=num_tasks, desc="evaluating", unit="task", disable=not progress, leave=False
    ) as bar:
        done = 0
        while done < num_tasks:
            n = min(batch_size, num_tasks - done)
            batch = family.sample(n, generator=generator, dtype=dtype).to(device)
            if shard is not None and shard.enabled:
                mine = shard.take(batch)
                local = (
                    task_scores(alg, params, mine, overrides=overrides).detach().cpu()
                    if mine.num_tasks
                    else torch.zeros(0, dtype=dtype)
                )
                scores.append(gather_tasks(shard, {"s": local})["s"])
            else:
                scores.append(task_scores(alg, params, batch, overrides=overrides).detach().cpu())
            done += n
            bar.update(n)
    values = torch.cat(scores)
    mean, ci = mean_ci95(values)
    return {"metric": family.metric, "mean": mean, "ci95": ci, "tasks": num_tasks}
