"""Milliseconds per meta-step on the GPU: per-task loop, eager vmap, and the CUDA graph,
with each way of computing the convolutions.

omniglot-5w1s network (64 channels), meta-batch 32, 16 inner GD steps (lr 0.1), λ = 2,
5 MINRES steps (iMAML's default), with the preset's 1 query image per class and with
the peer benchmark's 15. Variants: ``loop`` (per-task Python loop, eager, as the authors
and TorchOpt run), ``vmap`` (eager, one tensor per parameter), ``vmap-flat`` (eager, the
parameters as one vector), ``graph`` (vmap-flat captured once as a CUDA graph and
replayed; ``imaml.fast``), ``graph-dict`` (the graph, per-tensor parameters),
``graph-hvp-fwd`` (the graph, forward-over-reverse HVPs). MAML, FOMAML and Reptile are
timed on the graph path too.

Convolutions (``--convs``; ``conv_variants.set_conv_impl``): ``native`` (cuDNN; under vmap
a grouped convolution, one group per task), ``unfold`` (im2col + batched GEMM in full
float32), ``unfold-tf32`` (the same with TF32 matrix products, as cuDNN's convolutions
use TF32 by default), ``unfold-first`` (only the first layer unfolded: with one input
channel, vmap's grouped convolution is a depthwise one); for the compiled variants also
``slices`` and ``slices-first`` (im2col from strided slices, which inductor fuses;
``conv_variants.conv2d_slices``), each also with ``-tf32`` (TF32 matrix products). The
loop and the eager per-tensor vmap run with ``native`` only.

Times are medians over ``--repeats`` calls, each bracketed by synchronisations; memory is
``torch.cuda.max_memory_allocated`` for the call. Random images (the timing does not
depend on their content). On a machine without CUDA it runs on the CPU and skips the
graph variants (used to test the script).

``--compile MODE...`` times only the ``torch.compile``d iMAML step with the convolutions of ``--compile-conv`` (``fastest``: the fastest iMAML Q = 1
graph row of gpu_step.json in ``--out``), for each of ``--compile-queries`` (default 1),
each MODE in order (``pieces``: one inner step, the query gradient and one
Hessian-vector product compiled once each and reused by the loops; ``step``: the whole
step as one program; ``imaml.fast``) and each HVP mode of ``--compile-hvp``
(``rev``; ``fwd`` adds ``-hvp-fwd`` to the name) and each layout of ``--compile-layout``
(``default``; ``channels-last`` forces inductor's layout optimisation, which it skips for
vmap's grouped convolutions, and adds ``-channels-last``) and each set of inductor
options of ``--compile-inductor`` (``default``: none; ``KEY=VALUE[,KEY=VALUE]`` adds
``-KEY=VALUE`` to the name and records the set as ``inductor_options``): ``graph-compiled-MODE`` (the compiled step captured as a CUDA graph, the first call's
compilation and capture timed apart) and ``compiled-MODE`` (the same compiled step,
eager). Two uncompiled rows come first, for comparison on the same machine: ``graph``
(the eager vmap step) and ``graph-pieces`` (the piecewise step uncompiled: its cost of
recomputing the gradient at every Hessian-vector product). Each row records
``rel_to_graph``, its meta-gradient's relative distance from the ``graph`` row's.
``--compile-variant MODE:CONV[:OPTIONS]...`` adds compiled steps each with its own mode,
convolutions and inductor options (alone, only those; the ``graph`` and ``graph-pieces``
rows come once per convolution choice; ``--no-reference`` skips them, ``--graph-only``
skips the rows without the graph): benchmarks/gpu_check.sh's race stage.
Writes gpu_step_compiled.json.

    python benchmarks/gpu_step.py [--repeats 20] [--out docs/results/gpu] [--compile pieces]
"""

from __future__ import annotations

import argparse
import ast
import functools
import itertools
import json
import pathlib
import sys
import time

import torch
import torch._inductor.config as inductor_config

from imaml import TaskBatch, make_algorithm
from imaml.fast import MetaStep, make_pieces, meta_grad_piecewise
from imaml.models import OmniglotConvNet
from imaml.params import norm, sub

from common import OUT, machine, timeit
from conv_variants import set_conv_impl

CONVS = ("native", "unfold", "unfold-tf32", "unfold-first")
# im2col from strided slices (conv_variants.conv2d_slices), all layers or the first: for the
# compiled variants (--compile-conv), where inductor fuses the slices
COMPILE_CONVS = (*CONVS, "slices", "slices-first", "slices-tf32", "slices-first-tf32")


def batch_of(tasks: int, queries: int, device, g) -> TaskBatch:
    img = lambda n: torch.rand(tasks, 5 * n, 1, 28, 28, generator=g)
    lab = lambda n: torch.arange(5).repeat_interleave(n).repeat(tasks, 1)
    return TaskBatch(img(1), lab(1), img(queries), lab(queries)).to(device)


def use_conv(model: OmniglotConvNet, name: str) -> None:
    """Set the network's convolutions (and the TF32 matmul flag) for variant ``name``."""
    if name not in COMPILE_CONVS:
        raise ValueError(f"unknown conv variant {name!r}; choose from {COMPILE_CONVS}")
    set_conv_impl(model, name.removesuffix("-tf32"))
    # touched only when it must change: setting it at all (even to its default, False)
    # changes inductor's cache key, and imaml train's pieces would then compile again
    # instead of coming from this benchmark's cache
    if torch.backends.cuda.matmul.allow_tf32 != name.endswith("-tf32"):
        torch.backends.cuda.matmul.allow_tf32 = name.endswith("-tf32")


def fastest_conv(path: pathlib.Path) -> str:
    """The convolutions of the fastest iMAML Q = 1 graph row in ``path`` (vmap-flat rows
    where there are no graph rows, as on a CPU); ``native`` where there is no such file."""
    if not path.exists():
        print(f"no {path}: native convolutions")
        return "native"
    rows = [r for r in json.loads(path.read_text())["rows"] if "ms" in r]
    rows = [r for r in rows if r["algo"] == "imaml" and r["queries"] == 1]
    for variant in ("graph", "vmap-flat"):
        candidates = [r for r in rows if r["variant"] == variant]
        if candidates:
            return min(candidates, key=lambda r: r["ms"])["conv"]
    raise SystemExit(f"{path} has no iMAML row to choose a convolution from")


def inductor_options(text: str) -> dict:
    """``"default"`` (no options) or ``KEY=VALUE[,KEY=VALUE]``, each VALUE a Python literal
    and each KEY an option of ``torch._inductor.config`` (``triton.persistent_reductions``)."""
    if text == "default":
        return {}
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{item!r}: not KEY=VALUE")
        try:
            out[key] = ast.literal_eval(value)
            functools.reduce(getattr, key.split("."), inductor_config)  # unknown: fail now
        except (ValueError, SyntaxError, AttributeError) as e:
            msg = f"{item!r}: not KEY=VALUE of inductor's config ({e})"
            raise argparse.ArgumentTypeError(msg) from e
    return out


def compile_variant(text: str) -> tuple[str, str, dict]:
    """``MODE:CONV[:OPTIONS]`` (``pieces-solve:slices:triton.persistent_reductions=False``)
    as (mode, convolutions, inductor options)."""
    mode, _, rest = text.partition(":")
    conv, _, options = rest.partition(":")
    if mode not in ("pieces", "pieces-solve", "step") or conv not in COMPILE_CONVS:
        msg = f"{text!r}: not MODE:CONV[:OPTIONS] with MODE pieces, pieces-solve or step and "
        raise argparse.ArgumentTypeError(msg + f"CONV one of {COMPILE_CONVS}")
    return mode, conv, inductor_options(options or "default")


def measure(fn, device, repeats: int, warmup: int) -> dict:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    row = timeit(fn, repeats=repeats, warmup=warmup)
    row["ms"] = 1000 * row["median_s"]
    if cuda:
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--loop-repeats", type=int, default=2, help="0: no per-task loop rows")
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 15])
    ap.add_argument("--convs", nargs="+", default=list(CONVS), choices=CONVS)
    ap.add_argument("--out", type=pathlib.Path, default=OUT / "gpu")
    ap.add_argument(
        "--compile",
        nargs="+",
        default=[],
        choices=("pieces", "pieces-solve", "step"),
        help="only the torch.compile variants, in this order (pieces: one compiled "
        "Hessian-vector product per solver step; pieces-solve: the solve as one piece)",
    )
    ap.add_argument("--compile-conv", default="fastest", choices=("fastest", *COMPILE_CONVS))
    ap.add_argument(
        "--no-reference",
        action="store_true",
        help="with --compile: skip the uncompiled graph and graph-pieces rows (the meta-"
        "gradient they are compared with is still computed)",
    )
    ap.add_argument("--compile-hvp", nargs="+", default=["rev"], choices=("rev", "fwd"))
    ap.add_argument("--compile-queries", type=int, nargs="+", default=[1])
    ap.add_argument(
        "--compile-layout",
        nargs="+",
        default=["default"],
        choices=("default", "channels-last"),
        help="channels-last: force inductor's layout optimisation (channels-last convolutions)",
    )
    ap.add_argument(
        "--compile-inductor",
        nargs="+",
        default=[{}],
        type=inductor_options,
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="inductor options for the compiled variants, one set per argument (default: "
        "none), e.g. triton.mix_order_reduction=False: each set is a row of its own",
    )
    ap.add_argument(
        "--compile-variant",
        nargs="+",
        default=[],
        type=compile_variant,
        metavar="MODE:CONV[:KEY=VALUE[,KEY=VALUE]]",
        help="compiled steps to time besides the product of the --compile options, each "
        "with its own mode, convolutions and inductor options (HVPs: the first of "
        "--compile-hvp), e.g. pieces:slices or pieces-solve:native:triton."
        "persistent_reductions=False",
    )
    ap.add_argument(
        "--graph-only",
        action="store_true",
        help="time the compiled steps in the CUDA graph only, not also without it",
    )
    args = ap.parse_args(argv)
    return args


class Bench:
    """The rows of one output file, each timed on ``model``'s parameters and saved as soon
    as it is measured: a stage stopped by its time limit keeps its rows."""

    def __init__(self, args, device) -> None:
        self.device = device
        self.graph = "on" if device.type == "cuda" else "off"  # CUDA graphs on a GPU only
        g = torch.Generator().manual_seed(0)
        self.g = g
        self.model = OmniglotConvNet(5, channels=args.channels, generator=g).to(device)
        self.params = dict(self.model.named_parameters())
        self.hp = dict(model=self.model, lam=2.0, inner_steps=16, inner_lr=0.1)
        self.rows = []
        compiling = bool(args.compile or args.compile_variant)
        args.out.mkdir(parents=True, exist_ok=True)
        self.path = args.out / ("gpu_step_compiled.json" if compiling else "gpu_step.json")
        self.setup = dict(tasks=args.tasks, channels=args.channels, inner_steps=16, cg_steps=5)

    def imaml(self, **kw):
        return make_algorithm("imaml", **self.hp, **kw)

    def save(self) -> None:
        payload = {"machine": machine(), "device": str(self.device), "setup": self.setup}
        payload["rows"] = self.rows
        payload["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        self.path.write_text(json.dumps(payload, indent=1))

    def record(self, name, fn, *, algo, queries, conv, repeats, warmup=0, ref=None, extra=None):
        """Time ``fn`` (its first call, capture or compilation, apart) as one row; with
        ``ref`` (a meta-gradient) also the relative distance of ``fn``'s from it."""
        try:
            t0 = time.perf_counter()
            out = fn()  # the first call: capture, compilation
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - t0
            row = measure(fn, self.device, repeats, warmup=warmup)
            row["first_call_s"] = first
            if ref is not None:
                row["rel_to_graph"] = float(norm(sub(out[0], ref)) / norm(ref))
        except Exception as e:  # record and go on: one variant must not cost the others
            row = {"error": f"{type(e).__name__}: {e}"}
        row.update({"variant": name, "algo": algo, "queries": queries, "conv": conv})
        row.update(extra or {})
        self.rows.append(row)
        self.save()
        shown = f"{row['ms']:9.1f} ms" if "ms" in row else row["error"][:200]
        print(f"{algo:8s} Q={queries:2d} {conv:12s} {name:20s} {shown}", flush=True)

    def run(self, name, alg, batch, *, graph: bool, repeats: int, queries: int, conv: str):
        """One uncompiled step, eager or (on a GPU only) captured as a CUDA graph."""
        if graph and self.device.type != "cuda":
            return
        use_conv(self.model, conv)
        step = MetaStep(alg, mode="on" if graph else "off")
        fn = lambda: step(self.params, batch)
        self.record(name, fn, algo=alg.name, queries=queries, conv=conv, repeats=repeats)


def eager_rows(args, bench: Bench) -> None:
    """The per-task loop, the eager vmaps and the CUDA graph, for each query count and
    each way of computing the convolutions; MAML, FOMAML and Reptile on the graph."""
    imaml = bench.imaml
    for q in args.queries:
        batch = batch_of(args.tasks, q, bench.device, bench.g)
        kw = dict(batch=batch, repeats=args.repeats, queries=q)
        if args.loop_repeats > 0:
            loop = imaml(batched=False)
            bench.run(
                "loop", loop, **kw | {"repeats": args.loop_repeats}, graph=False, conv="native"
            )
        bench.run("vmap", imaml(flat=False), graph=False, conv="native", **kw)
        for conv in args.convs:
            if q == 1 or conv == "native":
                bench.run("vmap-flat", imaml(flat=True), graph=False, conv=conv, **kw)
            bench.run("graph", imaml(flat=True), graph=True, conv=conv, **kw)
            if q == 1:
                fwd = imaml(flat=True, hvp_mode="fwd")
                bench.run("graph-hvp-fwd", fwd, graph=True, conv=conv, **kw)
                for algo in ("maml", "fomaml", "reptile"):
                    alg = make_algorithm(algo, **{**bench.hp, "lam": 0.0})
                    bench.run("graph", alg, graph=True, conv=conv, **kw)
            elif conv == "native":
                bench.run("graph-dict", imaml(flat=False), graph=True, conv=conv, **kw)


def compile_combos(args) -> list[tuple]:
    """(mode, hvp, layout, inductor options, convolutions) per compiled step."""
    conv = args.compile_conv
    if conv == "fastest" and args.compile:
        conv = fastest_conv(args.out / "gpu_step.json")
    combos = [
        (mode, hvp, layout, options, conv)
        for mode, hvp, layout, options in itertools.product(
            args.compile, args.compile_hvp, args.compile_layout, args.compile_inductor
        )
    ]
    return combos + [(m, args.compile_hvp[0], "default", o, c) for m, c, o in args.compile_variant]


def reference_rows(args, bench: Bench, batch, q: int, conv: str) -> list:
    """The uncompiled graph's meta-gradient for ``conv`` (what the compiled rows are
    compared with), and unless ``--no-reference`` its row and, for the first query
    count, the uncompiled piecewise step's."""
    kw = dict(algo="imaml", queries=q, conv=conv, repeats=args.repeats)
    eager = MetaStep(bench.imaml(flat=True), mode=bench.graph)
    ref = eager(bench.params, batch)[0]
    if args.no_reference:
        return ref
    bench.record("graph", lambda: eager(bench.params, batch), **kw, ref=ref)
    if q == args.compile_queries[0]:
        plain = bench.imaml(flat=True)
        uncompiled = MetaStep(plain, mode=bench.graph)  # piecewise, nothing compiled
        pieces = make_pieces(plain)
        uncompiled.step = functools.partial(meta_grad_piecewise, plain, pieces=pieces)
        bench.record("graph-pieces", lambda: uncompiled(bench.params, batch), **kw, ref=ref)
    return ref


def compiled_rows(args, bench: Bench, combos: list[tuple], q: int) -> None:
    """Each compiled step of ``combos`` (``compile_combos``) with ``q`` query images per
    class: captured by the graph, and (unless ``--graph-only``) eager too."""
    batch = batch_of(args.tasks, q, bench.device, bench.g)
    refs = {}  # the uncompiled graph's meta-gradient per convolution choice
    for mode, hvp, layout, options, conv in combos:
        use_conv(bench.model, conv)
        if conv not in refs:
            refs[conv] = reference_rows(args, bench, batch, q, conv)
        alg = bench.imaml(flat=True, hvp_mode=hvp)
        solve = {"pieces": False, "pieces-solve": True}.get(mode)
        step = MetaStep(alg, mode=bench.graph, compile=mode.split("-")[0], solve_piece=solve)
        name = mode + ("-hvp-fwd" if hvp == "fwd" else "")
        name += "-channels-last" if layout == "channels-last" else ""
        name += "".join(f"-{k}={v}" for k, v in options.items())
        # inductor leaves vmap's grouped convolutions in NCHW unless forced, and cuDNN
        # then transposes around its NHWC kernels (profile_cuda_pieces_hvp-fwd)
        force = {"force_layout_optimization": layout == "channels-last", **options}
        kw = dict(algo="imaml", queries=q, conv=conv, repeats=args.repeats, ref=refs[conv])
        extra = {"inductor_options": options, "mode": mode, "hvp_mode": hvp}
        with inductor_config.patch(force):
            for variant, fn in ((f"graph-compiled-{name}", step), (f"compiled-{name}", step._step)):
                if variant.startswith("compiled-") and args.graph_only:
                    continue
                bench.record(
                    variant, lambda fn=fn: fn(bench.params, batch), **kw, warmup=1, extra=extra
                )
    use_conv(bench.model, "native")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bench = Bench(args, device)
    if args.compile or args.compile_variant:  # --compile-variant alone: only those
        combos = compile_combos(args)
        for q in args.compile_queries:
            compiled_rows(args, bench, combos, q)
    else:
        eager_rows(args, bench)
    use_conv(bench.model, "native")
    bench.save()
    print(f"wrote {bench.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
