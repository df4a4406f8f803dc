"""Hessian-vector products on the Omniglot network: reverse-over-reverse vs forward-over-reverse.

For one task (5 images) and for T tasks under vmap, time (a) one HVP from scratch and
(b) the meta-gradient solve's pattern: the gradient once, then 5 HVPs at the same point
(reverse mode linearises once and reuses the graph). float32, the machine's threads.
Writes docs/results/hvp_modes.json.

    python benchmarks/hvp_modes.py [--repeats 10] [--tasks 1 8 32]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.func import functional_call, vmap

from imaml.autodiff import hvp, linearize_grad
from imaml.models import OmniglotConvNet, cross_entropy

from common import timeit, write


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 8, 32])
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    g = torch.Generator().manual_seed(0)
    model = OmniglotConvNet(5, generator=g)
    p = {k: v.detach() for k, v in model.named_parameters()}
    rows = []
    for T in args.tasks:
        x = torch.rand(T, 5, 1, 28, 28, generator=g)
        y = torch.arange(5).repeat(T, 1)
        v = {k: torch.randn(T, *t.shape, generator=g) for k, t in p.items()}

        def one_task(xi, yi, vi, mode, k):
            f = lambda q: cross_entropy(functional_call(model, q, (xi,)), yi)[0]
            if k == 0:
                return hvp(f, p, vi, mode=mode)
            _, H = linearize_grad(f, p, mode=mode)
            out = vi
            for _ in range(k):
                out = H(out)
            return out

        for mode in ("rev", "fwd"):
            for k, label in ((0, "one_hvp"), (5, "grad_then_5_hvps")):
                fn = vmap(lambda xi, yi, vi, m=mode, kk=k: one_task(xi, yi, vi, m, kk))
                r = timeit(lambda fn=fn, x=x, y=y, v=v: fn(x, y, v), repeats=args.repeats)
                rows.append(
                    {
                        "tasks": T,
                        "mode": mode,
                        "pattern": label,
                        **r,
                        "per_task_ms": 1e3 * r["median_s"] / T,
                    }
                )
                print(
                    f"T={T:3d} {mode} {label:17s} {1e3 * r['median_s']:8.1f} ms "
                    f"({1e3 * r['median_s'] / T:6.1f} ms/task)"
                )
    write("hvp_modes", {"config": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
