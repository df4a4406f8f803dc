"""Seconds per meta-gradient: tasks batched with torch.func.vmap vs a per-task Python loop.

Sinusoid (MLP 1→40→40→1, 10-shot, 5 inner steps) for every algorithm, and the Omniglot
5-way 1-shot network (16 inner steps, 5 solver steps) for iMAML; meta-batch 32, float32,
the machine's threads. Writes docs/results/vmap_vs_loop.json.

    python benchmarks/vmap_vs_loop.py [--repeats 5] [--skip-omniglot]
"""

from __future__ import annotations

import argparse
import sys

import torch

from imaml import TaskBatch, make_algorithm
from imaml.config import from_preset
from imaml.data.sinusoid import SinusoidTasks
from imaml.models import OmniglotConvNet

from common import timeit, write


def omniglot_batch(g, T):
    try:
        from imaml.data.omniglot import OmniglotTasks, load_omniglot, make_split

        data = load_omniglot(progress=False, download_missing=False)
        return OmniglotTasks(data, make_split(data)["train"], n_way=5, k_shot=1, k_query=1).sample(
            T, generator=g
        ), "omniglot"
    except Exception:
        x = lambda: torch.rand(T, 5, 1, 28, 28, generator=g)
        y = torch.arange(5).repeat(T, 1)
        return TaskBatch(x(), y, x(), y), "random images"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--skip-omniglot", action="store_true")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    g = torch.Generator().manual_seed(0)
    rows = []
    fam = SinusoidTasks(k_shot=10, k_query=10)
    model = fam.make_model(g)
    params = dict(model.named_parameters())
    batch = fam.sample(args.meta_batch, generator=g)
    cfg = from_preset("sinusoid")
    for algo in ("imaml", "maml", "fomaml", "reptile"):
        row = {"task": "sinusoid", "algo": algo}
        for batched in (True, False):
            alg = make_algorithm(
                algo,
                model=model,
                loss="mse",
                **{**cfg.replace(algo=algo).algorithm_kwargs(), "batched": batched},
            )
            row["vmap" if batched else "loop"] = timeit(
                lambda a=alg: a.meta_grad(params, batch), repeats=args.repeats
            )
        row["speedup"] = row["loop"]["median_s"] / row["vmap"]["median_s"]
        rows.append(row)
        print(
            f"sinusoid {algo:8s} vmap {row['vmap']['median_s'] * 1e3:7.1f} ms  "
            f"loop {row['loop']['median_s'] * 1e3:7.1f} ms  ×{row['speedup']:.1f}"
        )
    if not args.skip_omniglot:
        model = OmniglotConvNet(5, generator=g)
        params = dict(model.named_parameters())
        batch, source = omniglot_batch(g, args.meta_batch)
        cfg = from_preset("omniglot-5w1s")
        row = {"task": f"omniglot-5w1s ({source})", "algo": "imaml"}
        for batched in (True, False):
            alg = make_algorithm(
                "imaml", model=model, **{**cfg.algorithm_kwargs(), "batched": batched}
            )
            row["vmap" if batched else "loop"] = timeit(
                lambda a=alg: a.meta_grad(params, batch), repeats=max(2, args.repeats // 2)
            )
        row["speedup"] = row["loop"]["median_s"] / row["vmap"]["median_s"]
        rows.append(row)
        print(
            f"omniglot imaml    vmap {row['vmap']['median_s']:7.2f} s   loop {row['loop']['median_s']:7.2f} s  "
            f"×{row['speedup']:.1f}"
        )
    write("vmap_vs_loop", {"config": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
