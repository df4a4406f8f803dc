"""Evaluation: adapt to each test task with the shared inner loop, score the query set.

The result is the mean over tasks with a 95% confidence interval 1.96·σ/√n (σ the
sample standard deviation over tasks), the protocol of the paper's tables.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from torch.func import vmap

from . import distributed
from .algorithms import make_algorithm
from .algorithms.base import MetaAlgorithm
from .checkpoint import load_checkpoint
from .config import Config
from .data import make_task_families
from .distributed import gather_tasks
from .machine import machine_info
from .params import Params
from .run_folder import write_json
from .runtime import TEST_STREAM, setup_runtime


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


def _inner_record(alg, params, overrides: dict) -> dict:
    """The inner-loop settings evaluation used, with λ as a number (learned or fixed)."""
    settings = alg.inner_settings(**overrides)
    lam = overrides.get("lam", alg.split_meta(params)[1])
    if isinstance(lam, dict):
        lam = {k: float(v) for k, v in lam.items()}
    settings["lam"] = float(lam) if not isinstance(lam, dict) else lam
    settings["solver"] = settings["solver"] if isinstance(settings["solver"], str) else "custom"
    return settings


def checkpoint_path(run_dir: str | os.PathLike, checkpoint: str) -> Path:
    """The file a run folder's ``checkpoint`` ("best" or "last") names: best.pt falls back
    to last.pt."""
    path = Path(run_dir) / f"{checkpoint}.pt"
    return Path(run_dir) / "last.pt" if checkpoint == "best" and not path.exists() else path


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    tasks: int | None = None,
    split: str = "test",
    checkpoint: str = "best",
    progress: bool = False,
    seed: int | None = None,
    shard: distributed.Dist | None = None,
    write: bool = True,
    **eval_overrides,
) -> dict:
    """Evaluate a run folder's best (or last) parameters on ``tasks`` tasks; writes
    eval.json unless ``write`` is false (a study of evaluation settings keeps the run's own)."""
    path = checkpoint_path(run_dir, checkpoint)
    run = Path(run_dir)
    ckpt = load_checkpoint(path)
    cfg = Config.from_dict(ckpt["config"])
    changes = {k: v for k, v in eval_overrides.items() if v is not None}
    if changes:
        cfg = cfg.replace(**changes)
    device, dtype = setup_runtime(cfg)
    families, split_info = make_task_families(cfg, progress=progress)
    if families.get(split) is None:
        raise ValueError(f"this run has no {split!r} split")
    model = families["train"].make_model().to(device=device, dtype=dtype)
    params = {k: v.to(device=device, dtype=dtype) for k, v in ckpt["params"].items()}
    alg = make_algorithm(
        cfg.algo, model=model, loss=families["train"].loss, **cfg.algorithm_kwargs()
    )
    n = cfg.test_tasks if tasks is None else tasks
    gen = torch.Generator().manual_seed(cfg.seed + TEST_STREAM if seed is None else seed)
    t0 = time.perf_counter()
    res = evaluate(
        alg,
        params,
        families[split],
        num_tasks=n,
        generator=gen,
        batch_size=cfg.meta_batch,
        overrides=cfg.eval_overrides(),
        device=device,
        dtype=dtype,
        progress=progress,
        shard=shard,
    )
    result = {
        **res,
        "split": split,
        "checkpoint": path.name,
        "checkpoint_step": ckpt["step"],
        "eval_inner": _inner_record(alg, params, cfg.eval_overrides()),
        # whether a test task can hold a class that training saw (the authors' split)
        "disjoint_test_classes": split != "test" or split_info["test_classes_in_training"] == 0,
        "test_classes_in_training": split_info["test_classes_in_training"]
        if split == "test"
        else None,
        "seconds": time.perf_counter() - t0,
        "config": cfg.to_dict(),
        "machine": {**machine_info(), "processes": 1 if shard is None else shard.world},
    }
    if not math.isfinite(result["mean"]):
        raise ValueError(f"evaluation of {path} gave a non-finite {res['metric']}")
    if write and (shard is None or shard.main):
        write_json(run / "eval.json", result)
    return result
