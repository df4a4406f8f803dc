"""The paper's Figure 2(b): seconds and peak memory per meta-step vs number of inner steps.

Omniglot 20-way 5-shot network, iMAML (5 MINRES steps), MAML and FOMAML, inner steps
1, 5, 10, 20, 40, 80. Each point runs in a fresh process: one warm-up meta-step, then
the median of ``--repeats``; memory is the process's peak RSS (CPU) or
``torch.cuda.max_memory_allocated`` (GPU). A method stops growing its step count once a
point takes longer than ``--time-cap`` seconds or does not fit in ``--memory-gib``. Writes docs/results/fig2b_cost.json
and .png (CPU: meta-batch 4 by default; the paper's figure used a GPU).

    python benchmarks/fig2b_cost.py [--meta-batch 4] [--time-cap 60] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import torch

from imaml import TaskBatch, make_algorithm
from imaml.models import OmniglotConvNet

from common import OUT, peak_rss_mib, timeit, write

STEPS = [1, 5, 10, 20, 40, 80]
ALGOS = ("imaml", "maml", "fomaml")


def point(algo: str, steps: int, args) -> dict:
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    model = OmniglotConvNet(20, generator=g).to(device)
    T, n = args.meta_batch, 20 * 5
    x = lambda: torch.rand(T, n, 1, 28, 28, generator=g).to(device)
    y = torch.arange(20).repeat_interleave(5).repeat(T, 1).to(device)
    batch = TaskBatch(x(), y, x(), y)
    kw = {"lam": 2.0, "cg_steps": 5} if algo == "imaml" else {}
    alg = make_algorithm(algo, model=model, inner_steps=steps, inner_lr=0.1, **kw)
    params = dict(model.named_parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = timeit(lambda: alg.meta_grad(params, batch), repeats=args.repeats)
    mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mib()
    return {"algo": algo, "inner_steps": steps, "seconds": t["median_s"], "peak_mib": mem}


def limit_memory(gib: float):
    """A preexec_fn capping the child's address space, so a point that does not fit fails with
    an allocation error instead of waking the kernel's OOM killer."""

    def apply():
        import resource

        limit = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_point(algo: str, steps: int, args) -> dict:
    """One point in a fresh process under an address-space cap (CPU: its own peak RSS)."""
    cmd = [sys.executable, __file__, "--point", algo, str(steps)]
    cmd += ["--meta-batch", str(args.meta_batch), "--repeats", str(args.repeats)]
    cmd += ["--device", args.device]
    out = subprocess.run(
        cmd, capture_output=True, text=True, preexec_fn=limit_memory(args.memory_gib)
    )
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()
        oom = "allocate" in out.stderr or "memory" in out.stderr.lower() or out.returncode < 0
        reason = (
            f"out of memory (limit {args.memory_gib:g} GiB)"
            if oom
            else (tail[-1] if tail else f"exit {out.returncode}")
        )
        return {"algo": algo, "inner_steps": steps, "error": reason}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--meta-batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--time-cap", type=float, default=60.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--memory-gib", type=float, default=16.0, help="address-space cap of each point (CPU)"
    )
    ap.add_argument("--out", type=pathlib.Path, default=OUT, help="folder of the JSON and PNG")
    ap.add_argument("--point", nargs=2, metavar=("ALGO", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.point:
        print(json.dumps(point(args.point[0], int(args.point[1]), args)))
        return 0
    rows = []
    cuda = args.device.startswith("cuda")
    for algo in ALGOS:
        for steps in STEPS:
            if cuda:  # in-process: max_memory_allocated is reset per point (a fresh CUDA
                # context per point would cost more than the points themselves)
                try:
                    r = point(algo, steps, args)
                except torch.cuda.OutOfMemoryError:
                    r = {"algo": algo, "inner_steps": steps, "error": "out of GPU memory"}
                torch.cuda.empty_cache()
            else:
                r = run_point(algo, steps, args)
            rows.append(r)
            if "error" in r:
                print(f"{algo:7s} {steps:3d} steps  {r['error']}", flush=True)
                break
            print(f"{algo:7s} {steps:3d} steps  {r['seconds']:7.3f} s  {r['peak_mib']:7.0f} MiB")
            if r["seconds"] > args.time_cap:
                break
    name = "fig2b_cost" if not cuda else "fig2b_cost_cuda"
    cfg = vars(args) | {"n_way": 20, "k_shot": 5, "k_query": 5, "out": str(args.out)}
    write(name, {"config": cfg, "rows": rows}, out=args.out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for algo in ALGOS:
        rs = [r for r in rows if r["algo"] == algo and "error" not in r]
        a1.plot([r["inner_steps"] for r in rs], [r["seconds"] for r in rs], marker="o", label=algo)
        a2.plot([r["inner_steps"] for r in rs], [r["peak_mib"] for r in rs], marker="o", label=algo)
    a1.set_ylabel("seconds per meta-step")
    a2.set_ylabel(
        "peak memory (MiB, " + ("RSS" if args.device == "cpu" else "CUDA allocated") + ")"
    )
    for a in (a1, a2):
        a.set_xlabel("inner steps")
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(
        f"Figure 2(b): Omniglot 20-way 5-shot, meta-batch {args.meta_batch}, {args.device}"
    )
    fig.tight_layout()
    fig.savefig(args.out / f"{name}.png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
