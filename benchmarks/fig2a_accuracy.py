"""The paper's Figure 2(a): meta-gradient accuracy vs inner GD steps, against the exact value.

Linear regression with a chosen condition number (``imaml.data.linear``), so that the
exact meta-gradient d/dθ L(φ*(θ)) is known in closed form. Relative error of the mean
meta-gradient over 16 tasks for MAML (backprop through the k GD steps on the proximal
objective), FOMAML, iMAML with CG for 1, 2, 5, 10 steps, and iMAML with MINRES 5 steps.
float64. Writes docs/results/fig2a_accuracy.json and .png.

    python benchmarks/fig2a_accuracy.py [--kappa 1000] [--lam 0.1] [--dim 20]
"""

from __future__ import annotations

import argparse
import sys

import torch

from imaml import make_algorithm
from imaml.data.linear import LinearRegressionTasks, exact_meta_grad

from common import OUT, write

STEPS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
METHODS = {
    "MAML": ("maml", {}),
    "FOMAML": ("fomaml", {}),
    "iMAML CG 1": ("imaml", {"solver": "cg", "cg_steps": 1}),
    "iMAML CG 2": ("imaml", {"solver": "cg", "cg_steps": 2}),
    "iMAML CG 5": ("imaml", {"solver": "cg", "cg_steps": 5}),
    "iMAML CG 10": ("imaml", {"solver": "cg", "cg_steps": 10}),
    "iMAML MINRES 5": ("imaml", {"solver": "minres", "cg_steps": 5}),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--kappa", type=float, default=1000.0, help="condition number of each task's A_s"
    )
    ap.add_argument("--lam", type=float, default=0.1)
    ap.add_argument("--dim", type=int, default=20)
    ap.add_argument("--tasks", type=int, default=16)
    args = ap.parse_args(argv)
    fam = LinearRegressionTasks(
        dim=args.dim, n_support=2 * args.dim, n_query=2 * args.dim, condition_number=args.kappa
    )
    batch = fam.sample(args.tasks, generator=torch.Generator().manual_seed(0))
    model = fam.make_model().double()
    theta = {"w": torch.zeros(args.dim, 1, dtype=torch.float64)}
    exact = (
        sum(exact_meta_grad(theta["w"], batch.task(i), lam=args.lam) for i in range(args.tasks))
        / args.tasks
    )
    lr = 1.0 / (1.0 + args.lam)  # 1/L of the proximal objective (A_s has eigenvalues ≤ 1)
    errors = {m: [] for m in METHODS}
    for k in STEPS:
        for label, (algo, extra) in METHODS.items():
            alg = make_algorithm(
                algo,
                model=model,
                loss="half_sse",
                lam=args.lam,
                inner_steps=k,
                inner_lr=lr,
                **extra,
            )
            g, _ = alg.meta_grad(theta, batch)
            errors[label].append(((g["w"] - exact).norm() / exact.norm()).item())
        print(f"k={k:5d} " + " ".join(f"{m}={errors[m][-1]:.2e}" for m in METHODS))
    write(
        "fig2a_accuracy",
        {"config": vars(args) | {"inner_lr": lr, "steps": STEPS}, "errors": errors},
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label in METHODS:
        ax.plot(
            STEPS,
            errors[label],
            marker="o",
            ms=3,
            label=label,
            ls="--" if label in ("MAML", "FOMAML") else "-",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("inner GD steps")
    ax.set_ylabel("relative error of the meta-gradient")
    ax.set_title(f"Figure 2(a): linear regression, κ = {args.kappa:g}, λ = {args.lam:g}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "fig2a_accuracy.png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
