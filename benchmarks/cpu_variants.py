"""The CPU meta-step under torch.compile and in bfloat16, measured against eager float32.

The peer setting (benchmarks/peers.py): omniglot-5w1s network, meta-batch 32, 16 inner GD
steps (lr 0.1), λ = 2, 5 CG steps (``--solver minres``: MINRES, our default, written to
cpu_variants_minres.*), 15 query images per class. Each variant runs in a
fresh process, under glibc's default allocator (``--malloc keep``: freed memory kept for
reuse, as ``imaml train`` does):

- ``eager``: the default path (vmap over tasks, float32); also its distance to float64,
  the scale of float32 rounding for this step (CG on an indefinite I + H/λ amplifies it).
- ``compiled-cold``: ``torch.compile`` (inductor, static shapes) with an empty inductor
  cache: seconds for the first call (compilation), then seconds per meta-step.
- ``compiled-warm``: the same in a new process that finds the cache the cold run left.
- ``pieces-cold`` / ``pieces-warm``: ``--compile pieces`` (one inner step, the query
  gradient and one Hessian-vector product compiled once each, the loops outside vmap;
  ``imaml.fast.meta_grad_piecewise``), cold and warm as above.
- ``bf16``: network and images in bfloat16 (this CPU has AVX512-BF16).
- ``autocast-bf16``: ``torch.autocast("cpu", torch.bfloat16)`` around the float32 step.

What else was tried, mostly on the compiled pieces (``--variants`` picks; each from its
own empty inductor cache; not in the default set):

- ``pieces-channels-last``: inductor's layout optimisation on and forced
  (``force_layout_optimization``, as ``gpu_step.py --compile-layout channels-last`` on
  CUDA, where inductor skips vmap's grouped convolutions): every convolution
  channels-last, inductor's own choice with oneDNN on the CPU, and what the pieces did
  there before ``imaml.fast.CPU_PIECES_OPTIONS`` turned it off;
- ``pieces-hvp-fwd``: forward-over-reverse Hessian-vector products;
- ``pieces-unfold-first``: the first convolution (one input channel: under vmap a
  depthwise grouped convolution) as im2col and a batched matrix product;
- ``pieces-solve`` / ``pieces-matvec``: the solver loop compiled as one piece that
  linearises the gradient once per task and runs the 5 solver steps under vmap (what the
  whole compiled step does; ``solve_piece=True``, the CPU's default since 2026-11-27), or
  one compiled product per solver step that recomputes the gradient (``solve_piece=False``,
  the default before);
- ``pieces-query-vmap``: the solve path with the query gradient under vmap for any number
  of query images (``query_per_task=None``; by default it runs task by task from 40 query
  images per task on, ``imaml.fast.QUERY_PER_TASK``);
- ``threads``: the eager step, its meta-batch split over two Python threads with one
  intra-op thread and a copy of the network each (one process with two intra-op threads
  leaves a core idle part of the time; two processes, ``distributed_throughput.py``,
  gain that way);
- ``pieces-threads``: the same with compiled pieces, compiled with one intra-op thread
  and inductor's ``cpp_wrapper`` (its Python wrapper holds the GIL through every kernel);
- ``pieces-chunk4`` / ``-chunk8`` / ``-chunk16``: the compiled pieces over 4, 8 or 16
  tasks at a time (``--task-chunk``), each chunk through its inner loop, linearisation
  and solve before the next, so that its tensors stay in the CPU's caches.

For each: median seconds per meta-step, peak RSS, and the relative distance of the
mean meta-gradient to the float64 one. Writes docs/results/cpu_variants.{json,png}.
``--interleave`` times the variants in one process instead, one step of each per round
(``run_interleaved``): fresh processes one after another also measure the machine's
drift over minutes.

    python benchmarks/cpu_variants.py [--repeats 3] [--queries 15] [--solver cg|minres]
        [--malloc system|keep] [--interleave] [--variants ...] [--name NAME]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import threading
import time

import torch

from imaml.fast import one_line

from common import OUT, interleaved, peak_rss_mib, run_fresh, timeit, write
from peers import CG, LAM, LR, STEPS, peer_algorithm, setup

VARIANTS = (
    "eager",
    "compiled-cold",
    "compiled-warm",
    "pieces-cold",
    "pieces-warm",
    "bf16",
    "autocast-bf16",
)
PIECES_TRIED = (
    "pieces-channels-last",
    "pieces-hvp-fwd",
    "pieces-unfold-first",
    "pieces-solve",
    "pieces-matvec",
    "pieces-query-vmap",
    "threads",
    "pieces-threads",
    "pieces-chunk4",
    "pieces-chunk8",
    "pieces-chunk16",
)


def threads_step(steps, params, batch):
    """The meta-batch split over Python threads, one per step of ``steps``, each running
    its step on its share of the tasks with one intra-op thread (``threads``,
    ``pieces-threads``); the shares' means combined by their kept tasks. Each step has
    its own copy of the network: ``torch.func.functional_call`` swaps the parameters
    into the module it is given, so two threads sharing one module get wrong
    meta-gradients. The first call first runs (compiles) each step in the caller's thread.
    An exception in any thread is raised."""
    from imaml import TaskBatch

    n = len(steps)
    cut = [batch.num_tasks * i // n for i in range(n + 1)]
    parts = [TaskBatch(*(t[cut[i] : cut[i + 1]] for t in batch)) for i in range(n)]
    threads = torch.get_num_threads()
    warm = False

    def run():
        nonlocal warm
        if not warm:  # compile (pieces) in the caller's thread, with one intra-op thread
            torch.set_num_threads(1)
            try:
                for step, part in zip(steps, parts, strict=True):
                    step(params, part)
            finally:
                torch.set_num_threads(threads)
            warm = True
        out, errors = [None] * n, []

        def work(i):
            torch.set_num_threads(1)
            try:
                out[i] = steps[i](params, parts[i])
            except Exception as e:  # raised below, in the caller's thread
                errors.append(e)

        workers = [threading.Thread(target=work, args=(i,)) for i in range(n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        torch.set_num_threads(threads)
        if errors:
            raise errors[0]
        kept = [(~stats["skipped"]).sum() for _, stats in out]
        return {
            k: sum(g[k] * c for (g, _), c in zip(out, kept, strict=True)) / sum(kept)
            for k in out[0][0]
        }

    return run


def variant_step(variant: str, args, model, batch, reference=None):
    """(fn, reference, force): one meta-step of ``variant`` as a function of nothing, the
    same step in float64 (computed unless given: it is the same for every variant), and
    the inductor options ``fn`` runs under."""
    from imaml import TaskBatch
    from imaml.fast import MetaStep

    from conv_variants import set_conv_impl

    def step_for(dtype, compile="off", **kw):
        if variant.endswith("threads") and dtype == torch.float32:
            steps = []
            for _ in range(2):  # a network of its own for each thread
                alg = peer_algorithm(copy.deepcopy(model), solver=args.solver, **kw)
                steps.append(MetaStep(alg, compile=compile))
            return threads_step(steps, {k: v.detach() for k, v in model.named_parameters()}, batch)
        m = copy.deepcopy(model).to(dtype)
        if variant == "pieces-unfold-first" and dtype == torch.float32:
            set_conv_impl(m, "unfold-first")
        alg = peer_algorithm(m, solver=args.solver, **kw)
        params = {k: v.detach() for k, v in m.named_parameters()}
        b = TaskBatch(batch.support_x.to(dtype), batch[1], batch.query_x.to(dtype), batch[3])
        # pieces-channels-last: inductor's options, not ours (CPU_PIECES_OPTIONS)
        own = {} if variant == "pieces-channels-last" else None
        pick = {"pieces-solve": True, "pieces-matvec": False}  # else MetaStep's default
        solve = pick.get(variant) if compile == "pieces" else None
        per_task = None if variant == "pieces-query-vmap" else "auto"
        step = MetaStep(
            alg, compile=compile, compile_options=own, solve_piece=solve, query_per_task=per_task
        )
        return lambda: step(params, b)[0]

    if reference is None:
        reference = step_for(torch.float64)()
    if variant == "bf16":
        fn = step_for(torch.bfloat16)
    elif variant == "autocast-bf16":
        plain = step_for(torch.float32)

        def fn():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return plain()
    else:
        mode = {"compiled": "step", "pieces": "pieces"}.get(variant.split("-")[0], "off")
        kw = {"hvp_mode": "fwd"} if "fwd" in variant else {}
        if "chunk" in variant:
            kw["task_chunk"] = int(variant.split("chunk")[1])
        fn = step_for(torch.float32, compile=mode, **kw)
    # cpp_wrapper: the compiled pieces release the GIL while they run (inductor's Python
    # wrapper holds it through every kernel)
    force = {
        "force_layout_optimization": variant == "pieces-channels-last",
        "cpp_wrapper": variant == "pieces-threads",
    }
    return fn, reference, force


def run_one(variant: str, args) -> dict:
    from torch._inductor import config as inductor_config

    from imaml.params import norm, sub

    fn, reference, force = variant_step(variant, args, *setup(args))
    row = {"variant": variant}
    try:
        with inductor_config.patch(force):
            t0 = time.perf_counter()
            out = fn()
            row["first_call_s"] = time.perf_counter() - t0
            row["rel_to_float64"] = float(norm(sub(out, reference)) / norm(reference))
            row.update(timeit(fn, repeats=args.repeats, warmup=0))
    except Exception as e:  # measured, not guessed: record what happens
        row["error"] = one_line(e)
        return row
    row["peak_rss_mib"] = peak_rss_mib()
    return row


def run_interleaved(variants: list[str], args) -> list[dict]:
    """The variants in this one process, their steps alternating round by round
    (``common.interleaved``: the AMD EPYC's compiled pieces took 3.3 s per step in one
    fresh process and 2.3 s in another later). One inductor cache for all (the
    environment's ``TORCHINDUCTOR_CACHE_DIR``, if set), so first calls are not
    cold-compilation times; peak RSS is the process's, not reported. A variant that fails
    is recorded, as ``run_one`` does, and left out of the rounds."""
    from torch._inductor import config as inductor_config

    from imaml.params import norm, sub

    model, batch = setup(args)
    fns, rows, reference = {}, {}, None
    for v in variants:
        rows[v] = {"variant": v}
        try:
            fn, reference, force = variant_step(v, args, model, batch, reference)
            with inductor_config.patch(force):
                t0 = time.perf_counter()
                out = fn()
        except Exception as e:
            rows[v]["error"] = one_line(e)
            print(f"{v:22s} failed: {rows[v]['error']}", flush=True)
            continue
        rows[v]["first_call_s"] = time.perf_counter() - t0
        rows[v]["rel_to_float64"] = float(norm(sub(out, reference)) / norm(reference))
        fns[v] = inductor_config.patch(force)(fn)  # each call under its variant's options
        print(f"{v:22s} first call {rows[v]['first_call_s']:7.1f} s", flush=True)
    for v, t in interleaved(fns, repeats=args.repeats).items():
        rows[v] |= t
        print(f"{v:22s} {t['median_s']:6.2f} s/meta-step (median)", flush=True)
    return list(rows.values())


def plot(rows: list[dict], solver: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "median_s" in r]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.barh([r["variant"] for r in ok], [r["median_s"] for r in ok], color="tab:blue")
    for i, r in enumerate(ok):
        note = f" {r['median_s']:.2f} s"
        if r["variant"].split("-")[0] in ("compiled", "pieces"):
            note += f" (first call {r['first_call_s']:.0f} s)"
        ax.text(r["median_s"], i, note, va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per meta-step (2 CPU cores)")
    ax.set_xlim(0, max(r["median_s"] for r in ok) * 1.9)
    ax.set_title(
        f"omniglot-5w1s iMAML meta-step, meta-batch 32,\n16 inner steps, 5 {solver.upper()} steps",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--queries", type=int, default=15)
    ap.add_argument(
        "--solver", choices=("cg", "minres"), default="cg", help="cg (as in peers.py) or minres"
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS + PIECES_TRIED,
        default=list(VARIANTS),
        help="which variants (default: all but the pieces experiments: "
        + " ".join(PIECES_TRIED)
        + ")",
    )
    ap.add_argument(
        "--malloc",
        choices=("system", "keep"),
        default="system",
        help="glibc's defaults, or freed memory kept for reuse as imaml train does",
    )
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="time the variants in one process, their steps alternating round by round "
        "(ratios that hold on a machine whose speed drifts); one inductor cache for all, "
        "TORCHINDUCTOR_CACHE_DIR's if set; no peak RSS",
    )
    ap.add_argument("--name", help="output name (default cpu_variants[_SOLVER])")
    ap.add_argument("--variant", choices=VARIANTS + PIECES_TRIED, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(run_one(args.variant, args)))
        return 0
    rows = run_interleaved(args.variants, args) if args.interleave else []
    with tempfile.TemporaryDirectory() as cache:
        for variant in args.variants if not args.interleave else ():
            # cold, then warm; the whole step and the pieces each start from an empty cache,
            # and so does each of the pieces experiments
            cold_warm = variant.endswith(("-cold", "-warm"))
            family = os.path.join(cache, variant.split("-")[0] if cold_warm else variant)
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": family}
            cmd = [sys.executable, __file__, "--variant", variant]
            cmd += ["--repeats", str(args.repeats), "--tasks", str(args.tasks)]
            cmd += ["--queries", str(args.queries), "--solver", args.solver]
            cmd += ["--malloc", args.malloc]
            rows.append({"variant": variant, **run_fresh(cmd, env=env)})
            r = rows[-1]
            print(
                f"{variant:14s} "
                + (
                    f"{r['median_s']:6.2f} s/meta-step  first call {r['first_call_s']:6.1f} s  "
                    f"rel to float64 {r['rel_to_float64']:.2e}  peak RSS {r['peak_rss_mib']:.0f} MiB"
                    if "median_s" in r
                    else f"failed: {r['error']}"
                ),
                flush=True,
            )
    eager = next((r for r in rows if r["variant"] == "eager" and "median_s" in r), None)
    for r in rows:
        if eager and "median_s" in r:
            r["speedup_over_eager"] = eager["median_s"] / r["median_s"]
    cfg = vars(args) | {"lam": LAM, "inner_steps": STEPS, "inner_lr": LR, "cg_steps": CG}
    cfg |= {"n_way": 5, "k_shot": 1, "threads": torch.get_num_threads()}
    name = args.name or ("cpu_variants" if args.solver == "cg" else f"cpu_variants_{args.solver}")
    write(name, {"config": cfg, "rows": rows})
    if not any("median_s" in r for r in rows):
        print("every variant failed: no plot", file=sys.stderr)
        return 1
    plot(rows, args.solver, OUT / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
