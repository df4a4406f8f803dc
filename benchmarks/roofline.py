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
the solver's vector arithmetic come on top). The achieved rates come from the measured
times of peers.py results (``--peers``, docs/results/peers.json by default; files of
``--interleave`` runs work too).

On a machine whose speed drifts over minutes, a peer run and this run measure different
moments of it. ``--rounds N`` measures the dense rates N times, each followed by one timed
step of our per-task loop (eager, as peers.py's ``ours-loop-cg`` runs it), and puts every
peer row at this run's speed: its time relative to the loop of its own run (ratios that
hold while the machine drifts) times the loop's time here. Writes
docs/results/NAME.{json,png} (``--name``, roofline by default).

    python benchmarks/roofline.py [--repeats 10] [--rounds N] [--peers PATH ...] [--name NAME]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from imaml import keep_freed_memory
from imaml.models import OmniglotConvNet

from common import OUT, seconds, timeit, write
from peers import TORCHOPT, data, peer_algorithm, step_fn

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


def step_flops(model, batch) -> dict:
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


def best_rate(layers: list[dict]) -> float:
    """Every image of the step goes through the four layers, so the best combined rate is
    the four layers' FLOP shares, each at its best rate over the batch sizes measured."""
    share = {r["layer"]: r["gflop"] / r["images"] for r in layers}
    rate = {k: max(r["gflops_per_s"] for r in layers if r["layer"] == k) for k in share}
    return sum(share.values()) / sum(share[k] / rate[k] for k in share)


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
    # over our compiled rows: the rate the targets would need of that step
    styles = {"5x torchopt-cg": ("black", "-"), "3x ours-loop-cg": ("tab:gray", ":")}
    labelled = set()
    for i, r in enumerate(rows):
        for t in payload.get("targets", []):
            if (t["for"], t["peers"], t["malloc"]) != (r["impl"], r.get("peers"), r["malloc"]):
                continue
            color, ls = styles[t["target"]]
            label = None if t["target"] in labelled else f"needed for {t['target']}"
            labelled.add(t["target"])
            ax.hlines(t["gflops_per_s"], i - 0.45, i + 0.45, colors=color, ls=ls, label=label)
    ax.set_ylabel("GFLOP/s (convolutions, per meta-step)")
    ax.set_title("Peer meta-step: achieved rate vs the machine's best on these convolutions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def relative(path: pathlib.Path) -> str:
    return os.path.relpath(path.resolve(), OUT.parent.parent)


def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--repeats", type=int, default=10, help="timed calls per dense convolution (median)"
    )
    ap.add_argument("--tasks", type=int, default=32, help="meta-batch of the counted step")
    ap.add_argument(
        "--queries", type=int, default=15, help="query images per class of the counted step"
    )
    ap.add_argument(
        "--peers",
        type=pathlib.Path,
        nargs="+",
        default=[OUT / "peers.json"],
        help="peers.py results whose measured times the achieved rates are computed from",
    )
    ap.add_argument("--name", default="roofline", help="output name under docs/results/")
    ap.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="measure the dense rates N times, each followed by one timed step of our per-task "
        "loop, and scale the peer run's times by its loop's time against the loop's time here "
        "(for a machine whose speed drifts between runs); 0: one measurement, the peer run's "
        "times as they are",
    )
    args = ap.parse_args(argv)
    for path in args.peers:
        if not path.is_file():
            ap.error(f"--peers {path}: no such file; run benchmarks/peers.py first")
        config = json.loads(path.read_text()).get("config", {})
        for key in ("tasks", "queries"):
            if config.get(key, getattr(args, key)) != getattr(args, key):
                ap.error(
                    f"--peers {path} was measured with {key}={config[key]}, this run has "
                    f"--{key} {getattr(args, key)}: give the same setting"
                )
    return args


def measure_rates(rounds: int, repeats: int, loop_step, ours: float) -> tuple[list, list]:
    """The dense convolutions' rates, ``rounds`` times (at least once), each round followed
    by one timed step of our loop where ``loop_step`` is given; returns each cell's median
    over the rounds, and each round's best rate (and loop time)."""
    if loop_step is not None:
        loop_step()  # warm-up
    sweeps, out = [], []
    for _ in range(max(rounds, 1)):
        sweeps.append([r for n in BATCHES for r in conv_rate(n, repeats)])
        out.append({"best_dense_conv_gflops_per_s": best_rate(sweeps[-1])})
        if loop_step is not None:
            t = seconds(loop_step)
            out[-1] |= {
                "ours_loop_s": t,
                "ours_loop_fraction_of_best": ours / t / out[-1]["best_dense_conv_gflops_per_s"],
            }
    layers = [
        {
            **cells[0],
            **{k: statistics.median(c[k] for c in cells) for k in ("median_s", "gflops_per_s")},
        }
        for cells in zip(*sweeps, strict=True)
    ]
    return layers, out


def achieved_rates(peers: list, flops: dict, best: float, loop_s: list[float]) -> list[dict]:
    """The rate each peers.py row reached; with ``loop_s`` (our loop's times in this run),
    at this run's speed of the machine: its time relative to its own run's loop, times
    the loop's median time here."""
    achieved = []
    for path in peers:
        peer_rows = [r for r in json.loads(path.read_text())["rows"] if "error" not in r]
        loop_in_peers = {
            r.get("malloc", "system"): r["median_s"]
            for r in peer_rows
            if r["impl"] == "ours-loop-cg"
        }
        for r in peer_rows:
            impl_flops = flops.get(r["impl"], flops["ours-loop-cg"])
            if "gflop" not in impl_flops:
                continue
            malloc = r.get("malloc", "system")
            row = {
                "peers": relative(path),
                "impl": r["impl"],
                "malloc": malloc,
                "median_s": r["median_s"],
            }
            seconds_here = r["median_s"]
            if loop_s and malloc in loop_in_peers:
                seconds_here = seconds_here / loop_in_peers[malloc] * statistics.median(loop_s)
                row["seconds_at_this_speed"] = seconds_here
            rate = impl_flops["gflop"] / seconds_here
            achieved.append(row | {"gflops_per_s": rate, "fraction_of_best": rate / best})
    return achieved


def speed_targets(achieved: list[dict], ours: float, best: float) -> list[dict]:
    """What each of our other rows would have to reach for the issue's CPU targets (5x the
    lean TorchOpt, 3x our per-task loop), at the same speed of the machine as its rows."""
    targets = []
    by_key = {(x["impl"], x["peers"], x["malloc"]): x for x in achieved}
    for r in achieved:
        if not r["impl"].startswith("ours-") or r["impl"] == "ours-loop-cg":
            continue
        for ref, times in (("torchopt-cg", 5), ("ours-loop-cg", 3)):
            x = by_key.get((ref, r["peers"], r["malloc"]))
            if x is None:
                continue
            needed = x.get("seconds_at_this_speed", x["median_s"]) / times
            targets.append(
                {
                    "target": f"{times}x {ref}",
                    "for": r["impl"],
                    "peers": r["peers"],
                    "malloc": r["malloc"],
                    "seconds": needed,
                    "gflops_per_s": ours / needed,
                    "fraction_of_best": ours / needed / best,
                }
            )
    return targets


def report(payload: dict) -> None:
    flops, best = payload["step_flops"], payload["best_dense_conv_gflops_per_s"]
    print(
        "one meta-step: "
        + ", ".join(f"{k} {v.get('gflop', float('nan')):.1f} GFLOP" for k, v in flops.items())
    )
    print(
        f"best dense-convolution rate on these layers: {best:.0f} GFLOP/s -> floor "
        f"{payload['floor_s_ours']:.2f} s/step"
    )
    for i, r in enumerate(payload["rounds"]):
        loop = ""
        if "ours_loop_s" in r:
            loop = f", our loop {r['ours_loop_s']:.2f} s "
            loop += f"({100 * r['ours_loop_fraction_of_best']:.0f}% of best)"
        print(
            f"round {i + 1}: best dense rate {r['best_dense_conv_gflops_per_s']:.0f} GFLOP/s{loop}"
        )
    for t in payload["targets"]:
        print(
            f"{t['for']} ({t['malloc']}) for {t['target']}: {t['seconds']:.2f} s, "
            f"{t['gflops_per_s']:.1f} GFLOP/s ({100 * t['fraction_of_best']:.0f}% of best)"
        )
    for r in payload["achieved"]:
        print(
            f"{r['impl']:20s} {r['malloc']:6s} {r['gflops_per_s']:6.1f} GFLOP/s "
            f"({100 * r['fraction_of_best']:.0f}% of best)"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_flush_denormal(True)
    keep_freed_memory()
    g = torch.Generator().manual_seed(0)
    model = OmniglotConvNet(5, generator=g)
    batch = data(args.tasks, args.queries, g)
    loop_step = step_fn("ours-loop-cg", copy.deepcopy(model), batch) if args.rounds else None
    flops = step_flops(model, batch)
    ours = flops["ours-loop-cg"]["gflop"]
    layers, rounds = measure_rates(args.rounds, args.repeats, loop_step, ours)
    best = best_rate(layers)
    loop_s = [r["ours_loop_s"] for r in rounds if "ours_loop_s" in r]
    achieved = achieved_rates(args.peers, flops, best, loop_s)
    payload = {
        "config": {**vars(args), "peers": [relative(p) for p in args.peers]},
        "step_flops": flops,
        "dense_conv_layers": layers,
        "best_dense_conv_gflops_per_s": best,
        "floor_s_ours": ours / best,
        "rounds": rounds,
        "achieved": achieved,
        "targets": speed_targets(achieved, ours, best),
    }
    write(args.name, payload)
    plot(payload, OUT / f"{args.name}.png")
    report(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
