"""Milliseconds per meta-step on the GPU: per-task loop, eager vmap, and the CUDA graph.

omniglot-5w1s network (64 channels), meta-batch 32, 16 inner GD steps (lr 0.1), λ = 2,
5 MINRES steps (iMAML's default), with the preset's 1 query image per class and with
the peer benchmark's 15. Variants: ``loop`` (per-task Python loop, eager, as the authors
and TorchOpt run), ``vmap`` (eager, one tensor per parameter), ``vmap-flat`` (eager, the
parameters as one vector), ``graph`` (vmap-flat captured once as a CUDA graph and
replayed; ``imaml.cuda_graph``). MAML, FOMAML and Reptile are timed on the graph path
too. Times are medians over ``--repeats`` calls, each bracketed by synchronisations;
memory is ``torch.cuda.max_memory_allocated`` for the call. Random images (the timing
does not depend on their content). On a machine without CUDA it runs on the CPU and
skips the graph variants (used to test the script).

    python benchmarks/gpu_step.py [--repeats 20] [--out docs/benchmarks/gpu]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

from imaml import TaskBatch, make_algorithm
from imaml.cuda_graph import MetaStep
from imaml.models import OmniglotConvNet

from common import OUT, machine, timeit


def batch_of(tasks: int, queries: int, device, g) -> TaskBatch:
    img = lambda n: torch.rand(tasks, 5 * n, 1, 28, 28, generator=g)
    lab = lambda n: torch.arange(5).repeat_interleave(n).repeat(tasks, 1)
    return TaskBatch(img(1), lab(1), img(queries), lab(queries)).to(device)


def measure(fn, device, repeats: int, warmup: int) -> dict:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    row = timeit(fn, repeats=repeats, warmup=warmup)
    row["ms"] = 1000 * row["median_s"]
    if cuda:
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--loop-repeats", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 15])
    ap.add_argument("--out", type=pathlib.Path, default=OUT / "gpu")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    model = OmniglotConvNet(5, channels=args.channels, generator=g).to(device)
    params = dict(model.named_parameters())
    hp = dict(model=model, lam=2.0, inner_steps=16, inner_lr=0.1)
    rows = []

    def run(name, alg, batch, *, graph: bool, repeats: int, queries: int) -> None:
        if graph and device.type != "cuda":
            return
        step = MetaStep(alg, mode="on") if graph else alg.meta_grad
        try:
            row = measure(lambda: step(params, batch), device, repeats, warmup=1)
        except Exception as e:  # record and go on: one variant must not cost the others
            row = {"error": f"{type(e).__name__}: {e}"}
        row.update({"variant": name, "algo": alg.name, "queries": queries})
        rows.append(row)
        shown = f"{row['ms']:9.1f} ms" if "ms" in row else row["error"][:80]
        print(f"{alg.name:8s} Q={queries:2d} {name:10s} {shown}", flush=True)

    for q in args.queries:
        batch = batch_of(args.tasks, q, device, g)
        imaml = lambda **kw: make_algorithm("imaml", **hp, **kw)
        run("loop", imaml(batched=False), batch, graph=False, repeats=args.loop_repeats, queries=q)
        run("vmap", imaml(flat=False), batch, graph=False, repeats=args.repeats, queries=q)
        run("vmap-flat", imaml(flat=True), batch, graph=False, repeats=args.repeats, queries=q)
        run("graph", imaml(flat=True), batch, graph=True, repeats=args.repeats, queries=q)
        run("graph-dict", imaml(flat=False), batch, graph=True, repeats=args.repeats, queries=q)
        if q == 1:
            for algo in ("maml", "fomaml", "reptile"):
                alg = make_algorithm(algo, **{**hp, "lam": 0.0})
                run("graph", alg, batch, graph=True, repeats=args.repeats, queries=q)
    args.out.mkdir(parents=True, exist_ok=True)
    setup = {"tasks": args.tasks, "channels": args.channels, "inner_steps": 16, "cg_steps": 5}
    payload = {"machine": machine(), "device": str(device), "setup": setup, "rows": rows}
    payload["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    (args.out / "gpu_step.json").write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out / 'gpu_step.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
