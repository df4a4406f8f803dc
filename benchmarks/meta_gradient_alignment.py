"""How well each configuration's meta-gradient points along MAML's, on real Omniglot tasks.

Under the learning-speed study's common evaluation (16 plain GD steps, λ = 0) the
objective is the query loss after plain adaptation, whose exact gradient is MAML's
(backpropagation through the 16 steps). For the parameters θ of a run folder (or the
initialisation), over ``--batches`` meta-batches of 32 omniglot-5w1s training tasks, this
records each configuration's mean meta-gradient's cosine with MAML's and its length
relative to it: a configuration that points away from MAML's gradient optimises another
objective than the one the common evaluation scores. For iMAML it also records how much
the implicit correction turns the gradient: the cosine of the meta-gradient
(I + C/λ)⁻¹∇L(φ) with the plain query gradient ∇L(φ) at the same φ (1: no correction).

    python benchmarks/meta_gradient_alignment.py --run results/learning_speed/fomaml-s0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from common import OUT, machine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning_speed import CONFIGS, config_for  # noqa: E402


def make_alg(cfg, model, families):
    from imaml.algorithms import make_algorithm

    return make_algorithm(
        cfg.algo, model=model, loss=families["train"].loss, **cfg.algorithm_kwargs()
    )


def flat(g: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in g.values()])


def mean_grad(alg, params, batches):
    return sum(flat(alg.meta_grad(params, b)[0]) for b in batches) / len(batches)


def mean_query_grad(alg, params, batches):
    """The tasks' mean query gradient ∇L(φ) at the configuration's own φ (its meta-gradient
    without the implicit correction) and their mean support loss L̂(φ)."""

    def one(sx, sy, qx, qy):
        phi = alg.adapt(params, sx, sy)
        return alg.query_gradient(phi, qx, qy)[0], alg.loss_of(sx, sy)(phi)

    g, support_loss = 0.0, 0.0
    for b in batches:
        gb, sl = torch.func.vmap(one)(b.support_x, b.support_y, b.query_x, b.query_y)
        g = g + flat({k: v.mean(0) for k, v in gb.items()}) / len(batches)
        support_loss += float(sl.mean()) / len(batches)
    return g, support_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--run", help="a run folder whose last.pt gives θ (default: the initialisation)"
    )
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument(
        "--configs", default=",".join(n for n in CONFIGS if n not in ("maml", "reptile"))
    )
    ap.add_argument("--name", default="meta_gradient_alignment")
    args = ap.parse_args()
    from imaml.checkpoint import load_checkpoint
    from imaml.data import make_task_families

    torch.manual_seed(0)
    ref_cfg = config_for("maml", 0)
    families, _ = make_task_families(ref_cfg, progress=False)
    model = families["train"].make_model(torch.Generator().manual_seed(0))
    params = {k: v.detach() for k, v in model.named_parameters()}
    step = 0
    if args.run:
        ckpt = load_checkpoint(Path(args.run) / "last.pt")
        params, step = {k: v for k, v in ckpt["params"].items()}, ckpt["step"]
    gen = torch.Generator().manual_seed(12345)
    batches = [families["train"].sample(32, generator=gen) for _ in range(args.batches)]
    ref = mean_grad(make_alg(ref_cfg, model, families), params, batches)
    rows = []
    for name in args.configs.split(","):
        cfg = config_for(name, 0)
        alg = make_alg(cfg, model, families)
        g = mean_grad(alg, params, batches)
        cos = float(g @ ref / (g.norm() * ref.norm()))
        row = {"name": name, "cos_with_maml": cos, "norm_over_maml": float(g.norm() / ref.norm())}
        if cfg.algo == "imaml":
            v, row["support_loss"] = mean_query_grad(alg, params, batches)
            row["cos_with_own_query_grad"] = float(g @ v / (g.norm() * v.norm()))
        rows.append(row)
        print(f"{name:<28} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "name"))
    payload = {
        "command": "python benchmarks/meta_gradient_alignment.py " + " ".join(sys.argv[1:]),
        "theta": args.run or "initialisation",
        "theta_step": step,
        "tasks": 32 * args.batches,
        "rows": rows,
        "machine": machine(),
    }
    (OUT / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
    print(f"wrote {OUT / (args.name + '.json')}")


if __name__ == "__main__":
    main()
