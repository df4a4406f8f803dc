"""Inner solvers on the Omniglot 5-way 1-shot network, meta-batch 32, λ = 2 (iMAML).

For each solver: inner iterations to reach ‖∇G(φ)‖ ≤ 1e-3 (mean and max over tasks,
measured batched with per-task stopping masks), seconds per iMAML meta-step when run
for that many iterations (max over tasks; 5 MINRES steps), and the peak memory (RSS) of
a fresh process doing one meta-step with 1 and with 100 inner iterations.
Writes docs/results/inner_solvers.json.

    python benchmarks/inner_solvers.py [--tol 1e-3] [--cap 500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from imaml import make_algorithm
from imaml.models import OmniglotConvNet

from common import peak_rss_mib, timeit, write

SETTINGS = {  # solver: (inner_lr, options)
    "gd": (0.1, {}),
    "momentum": (0.05, {}),
    "adam": (0.01, {}),
    "newton_cg": (1.0, {"cg_steps": 5}),
    "lbfgs": (1.0, {}),
}


def setup(tasks: int):
    g = torch.Generator().manual_seed(0)
    model = OmniglotConvNet(5, generator=g)
    params = dict(model.named_parameters())
    try:
        from imaml.data.omniglot import OmniglotTasks, load_omniglot, make_split

        data = load_omniglot(progress=False, download_missing=False)
        batch = OmniglotTasks(data, make_split(data)["train"], n_way=5, k_shot=1, k_query=1).sample(
            tasks, generator=g
        )
        source = "omniglot"
    except Exception:
        from imaml import TaskBatch

        x = lambda: torch.rand(tasks, 5, 1, 28, 28, generator=g)
        batch, source = (
            TaskBatch(x(), torch.arange(5).repeat(tasks, 1), x(), torch.arange(5).repeat(tasks, 1)),
            "random",
        )
    return model, params, batch, source


def algorithm(model, solver, steps, tol=0.0):
    lr, opts = SETTINGS[solver]
    return make_algorithm(
        "imaml",
        model=model,
        lam=2.0,
        inner_steps=steps,
        inner_lr=lr,
        inner_solver=solver,
        inner_options=opts,
        inner_tol=tol,
        cg_steps=5,
        solver="minres",
    )


def memory_point(solver: str, steps: int, tasks: int) -> None:
    torch.set_flush_denormal(True)
    model, params, batch, _ = setup(tasks)
    before = peak_rss_mib()
    algorithm(model, solver, steps).meta_grad(params, batch)
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "rss_before_mib": before}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--cap", type=int, default=500, help="most inner iterations tried")
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-point", nargs=2, metavar=("SOLVER", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_point:
        memory_point(args.memory_point[0], int(args.memory_point[1]), args.tasks)
        return 0
    torch.set_flush_denormal(True)
    model, params, batch, source = setup(args.tasks)
    rows = []
    for solver in SETTINGS:
        cap = args.cap if solver in ("gd", "momentum", "adam") else min(args.cap, 100)
        _, stats = algorithm(model, solver, cap, tol=args.tol).meta_grad(params, batch)
        its = stats["inner_iterations"].double()
        reached = (stats["inner_grad_norm"] <= args.tol * 1.0001).double().mean().item()
        steps = int(its.max())
        t = timeit(
            lambda s=steps, sv=solver: algorithm(model, sv, s).meta_grad(params, batch),
            repeats=args.repeats,
        )
        mem = {}
        for n in (1, 100):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--memory-point",
                    solver,
                    str(n),
                    "--tasks",
                    str(args.tasks),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            mem[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]
        row = {
            "solver": solver,
            "inner_lr": SETTINGS[solver][0],
            "iterations_mean": its.mean().item(),
            "iterations_max": steps,
            "fraction_reached_tol": reached,
            "seconds_per_meta_step": t["median_s"],
            "peak_rss_mib_1_iter": mem[1],
            "peak_rss_mib_100_iter": mem[100],
        }
        rows.append(row)
        print(
            f"{solver:10s} its mean {row['iterations_mean']:6.1f} max {steps:4d} reached {reached:.2f}  "
            f"{t['median_s']:.2f} s/step  RSS {mem[1]:.0f} → {mem[100]:.0f} MiB"
        )
    write(
        "inner_solvers",
        {
            "config": vars(args) | {"data": source, "lam": 2.0, "meta_gradient": "minres, 5 steps"},
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
