"""How far float32 rounding can move the peer-setting meta-gradient, and why.

The peer setting of benchmarks/peers.py (omniglot-5w1s network, meta-batch 32, 16 inner
GD steps, λ = 2, 5 solver steps, 15 query images per class). Every row is the relative
distance of a mean meta-gradient from the float64 one at the same θ:

- ``eager`` and ``pieces`` (``imaml.fast.meta_grad_piecewise``, uncompiled) in float32: the
  same operations in a different order;
- ``float64, θ nudged by ε``: θ multiplied element-wise by (1 + ε·N(0, 1)), computed in
  float64; this is the meta-gradient's own sensitivity to θ, with no rounding involved;
- ``eager float32, θ nudged by ε``: both at once.

The compiled variants' distances (benchmarks/cpu_variants.py) are to be read against
these: a change of θ far below one outer step (Adam moves θ by ~1e-3) already moves the
meta-gradient by percents, because the inner loop's ReLU and BatchNorm kinks and 5 solver
steps on an often indefinite I + H/λ make it a rough function of θ.
Writes docs/results/float32_sensitivity{,_SOLVER}.json.

    python benchmarks/float32_sensitivity.py [--solver minres|cg]
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from imaml.fast.pieces import make_pieces, meta_grad_piecewise
from imaml.models import OmniglotConvNet
from imaml.params import norm, sub

from common import write
from peers import CG, LAM, LR, STEPS, data, peer_algorithm

NUDGES = (1e-7, 1e-6, 1e-5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--solver", choices=("minres", "cg"), default="minres")
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--queries", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    g = torch.Generator().manual_seed(0)
    model = OmniglotConvNet(5, generator=g)
    batch = data(args.tasks, args.queries, g)

    def meta_grad(dtype, *, nudge=0.0, pieces=False):
        m = copy.deepcopy(model).to(dtype)
        alg = peer_algorithm(m, solver=args.solver)
        noise = torch.Generator().manual_seed(1)
        params = {
            k: v.detach() * (1 + nudge * torch.randn(v.shape, generator=noise).to(dtype))
            for k, v in m.named_parameters()
        }
        b = type(batch)(batch.support_x.to(dtype), batch[1], batch.query_x.to(dtype), batch[3])
        if pieces:
            out = meta_grad_piecewise(alg, params, b, make_pieces(alg))[0]
        else:
            out = alg.meta_grad_tensors(params, b)[0]
        return {k: v.double() for k, v in out.items()}

    ref = meta_grad(torch.float64)
    rows = []

    def row(name, out):
        rows.append({"row": name, "rel_to_float64": float(norm(sub(out, ref)) / norm(ref))})
        print(f"{name:40s} {rows[-1]['rel_to_float64']:.2e}", flush=True)

    row("eager float32", meta_grad(torch.float32))
    row("pieces float32 (uncompiled)", meta_grad(torch.float32, pieces=True))
    for eps in NUDGES:
        row(f"float64, θ nudged by {eps:g}", meta_grad(torch.float64, nudge=eps))
        row(f"eager float32, θ nudged by {eps:g}", meta_grad(torch.float32, nudge=eps))
    cfg = vars(args) | {"lam": LAM, "inner_steps": STEPS, "inner_lr": LR, "cg_steps": CG}
    name = "float32_sensitivity" + ("" if args.solver == "minres" else f"_{args.solver}")
    write(name, {"config": cfg | {"nudges": NUDGES}, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
