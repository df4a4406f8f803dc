"""How far the peer meta-step is from what this machine's convolutions can do.

Counts the floating-point operations of one meta-step of the peer benchmark (omniglot-5w1s
network, meta-batch 32, 16 inner GD steps, 5 CG steps, 15 query images per class) with
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products, forward
and backward), for our per-task loop and for both TorchOpt rows of peers.py (its
normal-equations CG does two Hessian-vector products per step). Our vmap path does the same
arithmetic batched; it is not counted directly because in PyTorch 2.13 the counter's
formula for the weight gradient of a grouped convolution (what vmap turns the tasks'
convolutions into) ignores ``groups`` and overcounts it by the number of tasks.

Then it measures the best rate this machine reaches on the network's own convolutions:
each of the four layers, forward and backward (the weight gradient, and the input gradient
but for the first layer, whose input is the images), as one dense
convolution over 5, 75, 160, 600 and 2,400 images (from one task's support set to the
meta-batch's query sets), with freed memory kept for reuse
(``imaml.keep_freed_memory``). Each layer's best rate over those batch sizes, weighted by
its share of the operations, is the best rate for the step's convolutions; the step's
operations divided by it is a floor on its time that an implementation of the same
arithmetic does not go under on this machine (element-wise work, batch normalisation and
the solver's vector arithmetic come on top). Reads docs/benchmarks/peers.json for the measured times.
Writes docs/benchmarks/roofline.{json,png}.

    python benchmarks/roofline.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from imaml import keep_freed_memory
from imaml.models import OmniglotConvNet

from common import OUT, timeit, write
from peers import TORCHOPT, data, peer_algorithm

# (input channels, input side) of the Omniglot network's four 3x3 stride-2 convolutions
LAYERS = ((1, 28), (64, 14), (64, 8), (64, 4))
# images per dense convolution: from one task's support set (5) to the meta-batch's query
# sets (32 x 75)
BATCHES = (5, 75, 160, 600, 2400)


def count_flops(fn) -> dict:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    by_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    return {
        "gflop": counter.get_total_flops() / 1e9,
        "gflop_by_op": {k: v / 1e9 for k, v in by_op.items()},
    }


def step_flops(tasks: int, queries: int) -> dict:
    g = torch.Generator().manual_seed(0)
    model = OmniglotConvNet(5, generator=g)
    batch = data(tasks, queries, g)
    alg = peer_algorithm(model, solver="cg", batched=False)
    params = dict(model.named_parameters())
    out = {"ours-loop-cg": count_flops(lambda: alg.meta_grad(params, batch))}
    meta = tuple(model.parameters())
    for name, step in TORCHOPT.items():
        try:
            out[name] = count_flops(lambda step=step: step(model, meta, batch))
        except ImportError as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def conv_rate(images: int, repeats: int) -> list[dict]:
    """GFLOP/s of each layer's convolution, forward + backward, as one dense convolution."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for c_in, side in LAYERS:
        # the first layer's input is the images: no gradient is taken with respect to it
        x = torch.randn(images, c_in, side, side, generator=g, requires_grad=c_in > 1)
        w = torch.randn(64, c_in, 3, 3, generator=g, requires_grad=True)
        gy = torch.randn_like(F.conv2d(x, w, stride=2, padding=1))
        wrt = (x, w) if c_in > 1 else (w,)

        def fwd_bwd(x=x, w=w, gy=gy, wrt=wrt):
            y = F.conv2d(x, w, stride=2, padding=1)
            torch.autograd.grad(y, wrt, gy)

        flops = count_flops(fwd_bwd)["gflop"]
        t = timeit(fwd_bwd, repeats=repeats, warmup=2)
        rows.append(
            {
                "layer": f"{c_in}x{side}x{side} -> 64",
                "images": images,
                "gflop": flops,
                "median_s": t["median_s"],
                "gflops_per_s": flops / t["median_s"],
            }
        )
    return rows


def plot(payload: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["achieved"] if "gflops_per_s" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"{r['impl']}\n({r['malloc']})" for r in rows]
    ax.bar(range(len(rows)), [r["gflops_per_s"] for r in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
    best = payload["best_dense_conv_gflops_per_s"]
    ax.axhline(best, color="tab:red", ls="--", label=f"best dense conv here ({best:.0f} GFLOP/s)")
    ax.set_ylabel("GFLOP/s (convolutions, per meta-step)")
    ax.set_title("Peer meta-step: achieved rate vs the machine's best on these convolutions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--queries", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    keep_freed_memory()
    flops = step_flops(args.tasks, args.queries)
    layers = [r for n in BATCHES for r in conv_rate(n, args.repeats)]
    # Every image of the step goes through the four layers, so the best combined rate is the
    # four layers' FLOP shares, each at its best rate over the batch sizes measured.
    share = {r["layer"]: r["gflop"] / r["images"] for r in layers}
    rate = {k: max(r["gflops_per_s"] for r in layers if r["layer"] == k) for k in share}
    best = sum(share.values()) / sum(share[k] / rate[k] for k in share)
    ours = flops["ours-loop-cg"]["gflop"]
    peers_path = OUT / "peers.json"
    achieved = []
    if peers_path.exists():
        for r in json.loads(peers_path.read_text())["rows"]:
            if "error" in r:
                continue
            impl_flops = flops.get(r["impl"], flops["ours-loop-cg"])
            if "gflop" not in impl_flops:
                continue
            achieved_rate = impl_flops["gflop"] / r["median_s"]
            achieved.append(
                {
                    "impl": r["impl"],
                    "malloc": r.get("malloc", "system"),
                    "median_s": r["median_s"],
                    "gflops_per_s": achieved_rate,
                    "fraction_of_best": achieved_rate / best,
                }
            )
    payload = {
        "config": vars(args),
        "step_flops": flops,
        "dense_conv_layers": layers,
        "best_dense_conv_gflops_per_s": best,
        "floor_s_ours": ours / best,
        "achieved": achieved,
        "peers_json": os.path.relpath(peers_path, OUT.parent.parent),
    }
    write("roofline", payload)
    plot(payload, OUT / "roofline.png")
    print(
        "one meta-step: "
        + ", ".join(f"{k} {v.get('gflop', float('nan')):.1f} GFLOP" for k, v in flops.items())
    )
    print(
        f"best dense-convolution rate on these layers: {best:.0f} GFLOP/s -> floor {ours / best:.2f} s/step"
    )
    for r in achieved:
        print(
            f"{r['impl']:20s} {r['malloc']:6s} {r['gflops_per_s']:6.1f} GFLOP/s ({100 * r['fraction_of_best']:.0f}% of best)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
