"""Meta-gradient solver accuracy on the Omniglot network, against a dense solve.

For several freshly initialised copies of the paper's Omniglot network (narrowed to
``--channels`` so that I + H/λ can be formed densely), after 16 inner GD steps on a
5-way 1-shot task with λ = 2, compare cg / minres / neumann at 1..50 steps with the
exact solution of (I + H/λ)x = ∇L(φ). float64. Writes
docs/results/solver_accuracy_<data>.json and .png.

    python benchmarks/solver_accuracy.py [--seeds 6] [--channels 8] [--data random|omniglot]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch
from torch.func import grad

import imaml
from imaml.autodiff import linearize_grad
from imaml.implicit import implicit_operator, solve_implicit
from imaml.linalg import dense_matrix
from imaml.models import OmniglotConvNet
from imaml.params import ravel

OUT = pathlib.Path(__file__).resolve().parents[1] / "docs" / "results"
STEPS = [1, 2, 5, 10, 20, 50]


def task_data(kind: str, g: torch.Generator, dtype):
    if kind == "omniglot":
        from imaml.data.omniglot import OmniglotTasks, load_omniglot, make_split

        data = load_omniglot(progress=False)
        tasks = OmniglotTasks(data, make_split(data)["train"], n_way=5, k_shot=1, k_query=1)
        b = tasks.sample(1, generator=g).task(0)
        return b.support_x.to(dtype), b.support_y, b.query_x.to(dtype), b.query_y
    x = lambda: torch.rand(5, 1, 28, 28, dtype=dtype, generator=g)
    return x(), torch.arange(5), x(), torch.arange(5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", type=int, default=6, help="number of random networks/tasks")
    ap.add_argument("--channels", type=int, default=8, help="conv channels (64 in the paper)")
    ap.add_argument("--data", choices=["random", "omniglot"], default="random")
    ap.add_argument("--lam", type=float, default=2.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    dt = torch.float64
    rows = []
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        model = OmniglotConvNet(5, channels=args.channels, generator=g).to(dt)
        alg = imaml.make_algorithm("imaml", model=model, inner_steps=16, lam=args.lam)
        theta = {k: v.detach() for k, v in model.named_parameters()}
        sx, sy, qx, qy = task_data(args.data, g, dt)
        phi = alg.adapt(theta, sx, sy)
        Ls = alg.loss_of(sx, sy)
        v = grad(alg.loss_of(qx, qy))(phi)
        _, hvp = linearize_grad(Ls, phi)
        A = implicit_operator(hvp, lam=args.lam)
        vf, unravel = ravel(v)
        M = dense_matrix(lambda x, A=A, u=unravel: ravel(A(u(x)))[0], vf.numel(), dtype=dt)
        eig = torch.linalg.eigvalsh(0.5 * (M + M.T))
        exact = torch.linalg.solve(M, vf)
        row = {
            "seed": seed,
            "n": vf.numel(),
            "eig_min": eig[0].item(),
            "eig_max": eig[-1].item(),
            "fomaml_error": ((vf - exact).norm() / exact.norm()).item(),
        }
        for solver in ["cg", "minres", "neumann"]:
            errs = []
            for steps in STEPS:
                x, info, _ = solve_implicit(Ls, v, phi, lam=args.lam, solver=solver, steps=steps)
                errs.append(((ravel(x)[0] - exact).norm() / exact.norm()).item())
            row[solver] = errs
        rows.append(row)
        print(
            f"seed {seed}: eig [{row['eig_min']:.3f}, {row['eig_max']:.2f}]  "
            + "  ".join(f"{s}@5={row[s][2]:.3f}" for s in ["cg", "minres", "neumann"])
        )
    OUT.mkdir(parents=True, exist_ok=True)
    result = {
        "config": vars(args) | {"steps": STEPS, "inner_steps": 16, "torch": torch.__version__},
        "rows": rows,
    }
    (OUT / f"solver_accuracy_{args.data}.json").write_text(json.dumps(result, indent=1))
    plot(rows, OUT / f"solver_accuracy_{args.data}.png")
    return 0


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, indefinite in zip(axes, [False, True], strict=True):
        sel = [r for r in rows if (r["eig_min"] <= 0) == indefinite]
        for solver, color in [("cg", "C0"), ("minres", "C1"), ("neumann", "C2")]:
            for i, r in enumerate(sel):
                ax.plot(
                    STEPS,
                    [min(e, 10.0) for e in r[solver]],
                    color=color,
                    alpha=0.7,
                    label=solver if i == 0 else None,
                    marker="o",
                    ms=3,
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("solver steps (Hessian-vector products)")
        ax.set_title(
            f"{'indefinite' if indefinite else 'positive definite'} I + H/λ ({len(sel)} tasks)"
        )
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.legend()
    axes[0].set_ylabel("relative error vs dense solve (clipped at 10)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
