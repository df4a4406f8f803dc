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

``--compile`` times only the ``torch.compile`` variants of the iMAML step (1 query image
per class): ``compiled`` (eager) and ``graph-compiled`` (the compiled step captured as a
CUDA graph), with the seconds of the first call (compilation, capture) apart, and writes
gpu_step_compiled.json.

    python benchmarks/gpu_step.py [--repeats 20] [--out docs/benchmarks/gpu] [--compile]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

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
    ap.add_argument("--compile", action="store_true", help="only the torch.compile variants")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    model = OmniglotConvNet(5, channels=args.channels, generator=g).to(device)
    params = dict(model.named_parameters())
    hp = dict(model=model, lam=2.0, inner_steps=16, inner_lr=0.1)
    rows = []

    def run(name, alg, batch, *, graph: bool, repeats: int, queries: int, compile=False) -> None:
        if graph and device.type != "cuda":
            return
        step = MetaStep(alg, mode="on" if graph else "off", compile=compile)
        try:
            t0 = time.perf_counter()
            step(params, batch)  # warm-up: capture, compilation
            if device.type == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - t0
            row = measure(lambda: step(params, batch), device, repeats, warmup=0)
            row["first_call_s"] = first
        except Exception as e:  # record and go on: one variant must not cost the others
            row = {"error": f"{type(e).__name__}: {e}"}
        row.update({"variant": name, "algo": alg.name, "queries": queries})
        rows.append(row)
        shown = f"{row['ms']:9.1f} ms" if "ms" in row else row["error"][:80]
        print(f"{alg.name:8s} Q={queries:2d} {name:10s} {shown}", flush=True)

    imaml = lambda **kw: make_algorithm("imaml", **hp, **kw)
    for q in [1] if args.compile else []:
        batch = batch_of(args.tasks, q, device, g)
        kw = dict(repeats=args.repeats, queries=q, compile=True)
        run("compiled", imaml(flat=True), batch, graph=False, **kw)
        run("graph-compiled", imaml(flat=True), batch, graph=True, **kw)
    for q in [] if args.compile else args.queries:
        batch = batch_of(args.tasks, q, device, g)
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
    path = args.out / ("gpu_step_compiled.json" if args.compile else "gpu_step.json")
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
