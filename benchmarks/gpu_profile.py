"""Where the GPU time of an iMAML meta-step goes, and which cuDNN settings pay.

omniglot-5w1s network, meta-batch 32, 16 inner GD steps, 5 MINRES steps, 1 query image
per class. (1) The CUDA-graph meta-step timed under cuDNN's defaults, with
``cudnn.benchmark`` (autotuned convolution algorithms; the shapes never change, so the
tuning is paid once), and without TF32 convolutions (true float32). (2) One eager
meta-step under ``torch.profiler``: the number of kernels, their summed device time (the
floor a graph replay cannot go under) and the top kernels, written to
``profile_cuda.txt``. On a machine without CUDA only the CPU part of (2) runs.

``--conv`` picks the convolutions as ``gpu_step.py --convs`` does (``fastest``: the
fastest iMAML Q = 1 graph row of gpu_step.json in ``--out``); for any but ``native`` the
files are named with it (``profile_cuda_unfold-tf32.txt``, ``gpu_profile_unfold-tf32.json``).
``--compile pieces|step`` profiles the compiled step instead (the graph captures the same
compiled step; only the default cuDNN settings are timed, as the compiled program is
built once) and ``--hvp-mode fwd`` forward-over-reverse products; both name the files too
(``profile_cuda_pieces_hvp-fwd.txt``).

    python benchmarks/gpu_profile.py [--out docs/results/gpu] [--conv native]
        [--compile off|pieces|step] [--hvp-mode rev|fwd]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch
from gpu_step import CONVS, batch_of, fastest_conv, use_conv
from torch.profiler import ProfilerActivity, profile

from imaml import make_algorithm
from imaml.fast import MetaStep
from imaml.models import OmniglotConvNet

from common import OUT, machine, timeit

VARIANTS = {
    "default": {},
    "cudnn.benchmark": {"benchmark": True},
    "no TF32": {"allow_tf32": False},
}


def graph_rows(alg, plain, params, batch, variants: dict, repeats: int) -> list[dict]:
    """The step captured in a CUDA graph under each cuDNN variant, timed (CUDA only)."""
    rows = []
    for name, flags in variants.items():
        saved = {k: getattr(torch.backends.cudnn, k) for k in flags}
        for k, v in flags.items():
            setattr(torch.backends.cudnn, k, v)
        step = MetaStep(alg, mode="on")
        step.step = plain.step
        t = timeit(lambda step=step: step(params, batch), repeats=repeats, warmup=2)
        for k, v in saved.items():
            setattr(torch.backends.cudnn, k, v)
        rows.append({"variant": name, "ms": 1000 * t["median_s"], **t})
        print(f"graph, {name:16s} {1000 * t['median_s']:7.2f} ms", flush=True)
    return rows


def profile_once(fn, cuda: bool):
    """One profiled call of ``fn``; on CUDA also its kernel count and summed kernel time."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    summary = {}
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        summary = {
            "kernels_per_meta_step": len(kernels),
            "summed_kernel_ms": sum(e.time_range.elapsed_us() for e in kernels) / 1000,
        }
        print(json.dumps(summary))
    return prof, summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--out", type=pathlib.Path, default=OUT / "gpu")
    ap.add_argument("--conv", default="native", choices=("fastest", *CONVS))
    ap.add_argument("--compile", default="off", choices=("off", "pieces", "step"))
    ap.add_argument("--hvp-mode", default="rev", choices=("rev", "fwd"))
    args = ap.parse_args(argv)
    conv = fastest_conv(args.out / "gpu_step.json") if args.conv == "fastest" else args.conv
    named = (
        conv if conv != "native" else None,
        args.compile if args.compile != "off" else None,
        "hvp-fwd" if args.hvp_mode == "fwd" else None,
    )
    suffix = "".join(f"_{n}" for n in named if n)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    g = torch.Generator().manual_seed(0)
    model = OmniglotConvNet(5, channels=args.channels, generator=g).to(device)
    params = dict(model.named_parameters())
    use_conv(model, conv)
    batch = batch_of(args.tasks, 1, device, g)
    alg = make_algorithm(
        "imaml",
        model=model,
        lam=2.0,
        inner_steps=16,
        inner_lr=0.1,
        flat=True,
        hvp_mode=args.hvp_mode,
    )
    # one step function (compiled once with --compile): the profile and every graph run it
    plain = MetaStep(alg, mode="off", compile=args.compile)
    variants = VARIANTS if args.compile == "off" else {"default": {}}
    rows = graph_rows(alg, plain, params, batch, variants, args.repeats) if cuda else []
    eager = lambda: plain(params, batch)
    eager()
    prof, summary = profile_once(eager, cuda)
    events = prof.key_averages()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=25)
    args.out.mkdir(parents=True, exist_ok=True)
    header = (
        "# One iMAML meta-step without a graph (vmap, flat parameters), omniglot-5w1s network, "
        f"meta-batch {args.tasks}, 16 inner steps, 5 MINRES steps, convolutions {conv}, "
        f"compile {args.compile}, HVPs {args.hvp_mode}\n"
        f"# {machine()}\n# {json.dumps(summary)}\n"
    )
    (
        args.out / (f"profile_cuda{suffix}.txt" if cuda else f"profile_eager_cpu{suffix}.txt")
    ).write_text(header + table + "\n")
    payload = {"machine": machine(), "conv": conv, "compile": args.compile}
    payload |= {"hvp_mode": args.hvp_mode, "graph_variants": rows, **summary}
    (args.out / f"gpu_profile{suffix}.json").write_text(json.dumps(payload, indent=1))
    print(table[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
