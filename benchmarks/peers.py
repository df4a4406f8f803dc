"""Peers side by side: our vmap path, our per-task loop, TorchOpt's implicit-gradient iMAML.

TorchOpt runs twice: ``torchopt-cg``, written as lean as we could against its
``custom_root`` API with CG, and ``torchopt-example``, the way TorchOpt's own iMAML example
writes it (a ``torchopt.sgd`` inner optimiser, CG on the normal equations); see
``torchopt_meta_step`` and ``torchopt_example_meta_step``.

omniglot-5w1s network, meta-batch 32, 16 inner GD steps (lr 0.1), λ = 2, 5 CG steps, 15
query images per class (as in docs/notebook/prototypes.md's peer table). Every implementation runs in a
fresh process (so peak RSS is its own): one warm-up meta-step, then the median of
``--repeats``. Ours is run with CG (TorchOpt's solver) and with MINRES (our default),
with CG vmapped over 8 tasks at a time (``task_chunk=8``, bounding memory), and with CG
and MINRES through ``torch.compile``: ``compiled`` compiles the whole step, ``pieces``
compiles one inner step, the query gradient and one Hessian-vector product and loops over
them (``imaml.fast.meta_grad_piecewise``; ``pieceschunk8``: over 8 tasks at a time). The first call, the compilation, is reported apart
as ``first_call_s``; every run starts from an empty inductor cache.

Every implementation runs under glibc's default allocator (``system``, as TorchOpt's users
run it) and with freed memory kept for reuse (``keep``, ``imaml.keep_freed_memory``, what
``imaml train`` does on the CPU); each row records its minor page faults per meta-step.
Writes docs/results/peers.json; needs ``pip install -e .[bench]`` for TorchOpt.

``--interleave`` times the implementations in one process instead, one step of each per
round, alternating the order (``run_interleaved``): on a machine whose speed drifts over
minutes, fresh processes run one after another measure the drift as much as the code.

    python benchmarks/peers.py [--repeats 3] [--queries 15] [--impls a,b] [--mallocs system,keep]
    python benchmarks/peers.py --interleave --mallocs keep --impls a,b,c --name NAME
    python benchmarks/peers.py --float64   # the rows' meta-gradients against the converged one
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from imaml import make_algorithm
from imaml.fast import MetaStep, one_line
from imaml.models import OmniglotConvNet
from imaml.params import norm, sub

from common import interleaved, peak_rss_mib, run_fresh, timeit, use_malloc, write

IMPLS = (
    "ours-vmap-cg",
    "ours-vmap-minres",
    "ours-chunk8-cg",
    "ours-compiled-cg",
    "ours-compiled-minres",
    "ours-pieces-cg",
    "ours-pieces-minres",
    "ours-pieceschunk8-cg",
    "ours-loop-cg",
    "torchopt-cg",
    "torchopt-example",
)
MALLOCS = ("system", "keep")
# speedup_vs_<key> and rss_vs_<key> of every row are over these rows under ``system``
REFERENCES = (
    ("torchopt", "torchopt-cg"),
    ("torchopt_example", "torchopt-example"),
    ("ours_loop", "ours-loop-cg"),
)
LAM, STEPS, LR, CG = 2.0, 16, 0.1, 5


def data(tasks: int, queries: int, g, dtype=torch.float32):
    from imaml.data.omniglot import OmniglotTasks, load_omniglot, make_split

    d = load_omniglot(progress=False, download_missing=False)
    return OmniglotTasks(d, make_split(d)["train"], n_way=5, k_shot=1, k_query=queries).sample(
        tasks, generator=g, dtype=dtype
    )


def peer_algorithm(model, *, solver: str, **kwargs):
    """Our iMAML with the peer setting's hyperparameters (``kwargs`` override them)."""
    hp = {"lam": LAM, "inner_steps": STEPS, "inner_lr": LR, "cg_steps": CG} | kwargs
    return make_algorithm("imaml", model=model, solver=solver, **hp)


def _torchopt_functions(model):
    """(f, objective): the network as a function of a parameter tuple, and the proximal
    inner objective L̂(φ) + (λ/2)‖φ − θ‖² of one task."""
    names = [n for n, _ in model.named_parameters()]
    f = lambda params, x: functional_call(model, dict(zip(names, params, strict=True)), (x,))

    def objective(params, meta, x, y):
        reg = sum(((p - m) ** 2).sum() for p, m in zip(params, meta, strict=True))
        return F.cross_entropy(f(params, x), y) + 0.5 * LAM * reg

    return f, objective


def _torchopt_batch(f, inner, meta_params, batch) -> None:
    """Accumulate the mean over the batch's tasks of the query loss's gradient into
    ``.grad``, φ of each task from ``inner`` (a TorchOpt ``custom_root`` function)."""
    for p in meta_params:
        p.grad = None
    for i in range(batch.num_tasks):
        sx, sy, qx, qy = batch.task(i)
        start = tuple(p.detach().clone().requires_grad_() for p in meta_params)
        phi = inner(start, meta_params, sx, sy)
        (F.cross_entropy(f(phi, qx), qy) / batch.num_tasks).backward()


def torchopt_meta_step(model, meta_params, batch):
    """One meta-step of iMAML written against TorchOpt 0.7.3's implicit-differentiation API,
    as lean as we could make it: CG, and an inner loop that keeps no graph between steps."""
    import torchopt

    f, objective = _torchopt_functions(model)

    @torchopt.diff.implicit.custom_root(
        torch.func.grad(objective, argnums=0),
        argnums=1,
        solve=torchopt.linear_solve.solve_cg(maxiter=CG),
    )
    def inner(params, meta, x, y):
        meta = tuple(m.detach() for m in meta)
        with torch.enable_grad():  # TorchOpt runs the solver inside autograd.Function.forward
            params = tuple(p.detach().requires_grad_() for p in params)
            for _ in range(STEPS):
                grads = torch.autograd.grad(objective(params, meta, x, y), params)
                params = tuple(
                    (p - LR * gr).detach().requires_grad_()
                    for p, gr in zip(params, grads, strict=True)
                )
        return tuple(p.detach() for p in params)

    _torchopt_batch(f, inner, meta_params, batch)


def torchopt_example_meta_step(model, meta_params, batch):
    """One meta-step the way TorchOpt's own iMAML example (examples/iMAML/imaml_omniglot.py
    in its repository) writes it: the inner loop steps a ``torchopt.sgd`` optimiser with
    ``torch.autograd.grad`` on the proximal objective, and the implicit gradient is solved
    by ``solve_normal_cg(maxiter=5, atol=0)``, CG on the normal equations (two products with
    I + H/λ per iteration, and sound when it is indefinite, as our MINRES is). Two
    differences from the example, both to compute the same meta-gradient as the other rows:
    every task starts from its own copy of θ (the example's in-place ``apply_updates``
    shares one copy, so each task would start where the previous one ended), and the batch
    gives one meta-gradient (the example steps the meta-optimiser after every task)."""
    import torchopt

    f, objective = _torchopt_functions(model)

    @torchopt.diff.implicit.custom_root(
        torch.func.grad(objective, argnums=0),
        argnums=1,
        solve=torchopt.linear_solve.solve_normal_cg(maxiter=CG, atol=0),
    )
    def inner(params, meta, x, y):
        sgd = torchopt.sgd(lr=LR)
        state = sgd.init(params)
        with torch.enable_grad():
            for _ in range(STEPS):
                grads = torch.autograd.grad(objective(params, meta, x, y), params)
                updates, state = sgd.update(grads, state)
                params = torchopt.apply_updates(params, updates)
        return params

    _torchopt_batch(f, inner, meta_params, batch)


TORCHOPT = {"torchopt-cg": torchopt_meta_step, "torchopt-example": torchopt_example_meta_step}


def float64_distances(tasks: int, queries: int) -> dict:
    """That the rows compute the same meta-gradient, and how far 5 solver steps get.

    In float64 on a small batch, the relative distance of each implementation's mean
    meta-gradient to the converged one (our MINRES run for 200 steps; TorchOpt's CG run to
    its tolerance lands on it too). CG rows agree with one another to rounding; MINRES and
    TorchOpt's normal-equations CG are different 5-step approximations of the same solve.
    """
    g = torch.Generator().manual_seed(0)
    model = OmniglotConvNet(5, generator=g).double()
    batch = data(tasks, queries, g, dtype=torch.float64)
    params = dict(model.named_parameters())
    ours = lambda **kw: peer_algorithm(model, **kw).meta_grad(params, batch)[0]
    converged = ours(solver="minres", cg_steps=200)
    grads = {
        "ours-vmap-cg": ours(solver="cg"),
        "ours-vmap-minres": ours(solver="minres"),
        "ours-loop-cg": ours(solver="cg", batched=False),
    }
    for name, step in TORCHOPT.items():
        step(model, tuple(params.values()), batch)
        grads[name] = {k: p.grad for k, p in params.items()}
    rel = lambda a, b: float(norm(sub(a, b)) / norm(b))
    return {
        "distance_to_converged": {k: rel(v, converged) for k, v in grads.items()},
        "cg_rows_vs_ours_vmap_cg": {
            k: rel(grads[k], grads["ours-vmap-cg"]) for k in ("ours-loop-cg", "torchopt-cg")
        },
    }


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def step_fn(impl: str, model, batch):
    """One meta-step of ``impl`` on ``batch`` as a function of nothing."""
    if impl.startswith("ours"):
        _, path, solver = impl.split("-")
        alg = peer_algorithm(
            model,
            solver=solver,
            batched=path != "loop",
            task_chunk=8 if path.endswith("chunk8") else None,  # 8 tasks at a time
        )
        params = dict(model.named_parameters())
        mode = "step" if path == "compiled" else "pieces" if path.startswith("pieces") else "off"
        step = MetaStep(alg, compile=mode)
        fn = lambda: step(params, batch)
    else:
        meta = tuple(model.parameters())
        fn = lambda: TORCHOPT[impl](model, meta, batch)
    return fn


def setup(args):
    """This process's allocator, and the network and the batch every implementation gets."""
    torch.set_flush_denormal(True)
    use_malloc(args.malloc)
    g = torch.Generator().manual_seed(0)
    model = OmniglotConvNet(5, generator=g)
    return model, data(args.tasks, args.queries, g)


def run_one(impl: str, args) -> dict:
    fn = step_fn(impl, *setup(args))
    t0 = time.perf_counter()
    fn()  # warm-up (for the compiled step: compilation)
    first = time.perf_counter() - t0
    faults = minor_faults()
    t = timeit(fn, repeats=args.repeats, warmup=0)
    return {
        "impl": impl,
        "malloc": args.malloc,
        **t,
        "first_call_s": first,
        "minor_faults_per_step": (minor_faults() - faults) / args.repeats,
        "peak_rss_mib": peak_rss_mib(),
    }


def run_interleaved(impls: list[str], args) -> list[dict]:
    """Every implementation in this one process, their steps alternating round by round
    (``common.interleaved``: the AMD EPYC's speed drifts, the same compiled step took 3.3 s
    in one process and 2.3 s in another half an hour later). Each gets its own copy of the
    same network. Peak memory and page faults are the process's, not an implementation's,
    so they are not reported here; an implementation that fails is recorded and left out."""
    model, batch = setup(args)
    fns, rows = {}, {}
    for impl in impls:
        rows[impl] = {"impl": impl, "malloc": args.malloc}
        try:
            fn = step_fn(impl, copy.deepcopy(model), batch)
            t0 = time.perf_counter()
            fn()  # warm-up (for the compiled step: compilation)
        except Exception as e:  # recorded, as a failed fresh process is
            rows[impl]["error"] = one_line(e)
            print(f"{impl:20s} failed: {rows[impl]['error']}", flush=True)
            continue
        fns[impl] = fn
        rows[impl]["first_call_s"] = time.perf_counter() - t0
        print(f"{impl:20s} first call {rows[impl]['first_call_s']:7.1f} s", flush=True)
    for impl, t in interleaved(fns, repeats=args.repeats).items():
        rows[impl] |= t
        print(f"{impl:20s} {args.malloc:6s} {t['median_s']:6.2f} s/meta-step", flush=True)
    return list(rows.values())


def _names(text: str, valid: tuple[str, ...], what: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise SystemExit(
            f"peers.py: unknown {what} {bad or text!r}; choose from {', '.join(valid)}"
        )
    return names


def run_fresh_rows(impls: list[str], mallocs: list[str], args) -> list[dict]:
    """Each implementation under each allocator in a fresh process, from an empty cache."""
    rows = []
    for impl in impls:
        for malloc in mallocs:
            cmd = [sys.executable, __file__, "--impl", impl, "--malloc", malloc]
            for opt in ("repeats", "tasks", "queries"):
                cmd += [f"--{opt}", str(getattr(args, opt))]
            with tempfile.TemporaryDirectory() as cache:  # compile from scratch, every time
                row = run_fresh(cmd, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
            rows.append({"impl": impl, "malloc": malloc, **row})
            if "error" in row:
                print(f"{impl} ({malloc}): failed: {row['error']}")
                continue
            print(
                f"{impl:20s} {malloc:6s} {row['median_s']:6.2f} s/meta-step  "
                f"peak RSS {row['peak_rss_mib']:6.0f} MiB  "
                f"{row['minor_faults_per_step']:9.0f} page faults/step"
            )
    return rows


def add_speedups(rows: list[dict], args) -> None:
    """Speed-ups over the references as their users run them (glibc's default allocator);
    interleaved, over the references in the same process."""
    ok = {(r["impl"], r["malloc"]): r for r in rows if "error" not in r}
    for key, ref_impl in REFERENCES:
        ref = ok.get((ref_impl, args.malloc if args.interleave else "system"))
        for r in ok.values() if ref else ():
            r[f"speedup_vs_{key}"] = ref["median_s"] / r["median_s"]
            if "peak_rss_mib" in r:
                r[f"rss_vs_{key}"] = r["peak_rss_mib"] / ref["peak_rss_mib"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--queries", type=int, default=15)
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of IMPLS")
    ap.add_argument("--mallocs", default=",".join(MALLOCS), help="system, keep or both")
    ap.add_argument("--name", default="peers", help="output docs/results/NAME.json")
    ap.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--malloc", choices=MALLOCS, default="system", help=argparse.SUPPRESS)
    ap.add_argument(
        "--float64",
        action="store_true",
        help="instead of timing, check the rows' meta-gradients against the converged one in "
        "float64 (2 tasks, 3 query images per class); writes docs/results/NAME_float64.json",
    )
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="time the implementations in one process, their steps alternating round by "
        "round, under the one allocator of --mallocs (speed ratios that hold on a machine "
        "whose speed drifts; no memory figures); writes docs/results/NAME.json",
    )
    args = ap.parse_args(argv)
    if args.float64:
        dist = float64_distances(tasks=2, queries=3)
        for k, v in dist["distance_to_converged"].items():
            print(f"{k:20s} relative distance to the converged meta-gradient {v:.2e}")
        for k, v in dist["cg_rows_vs_ours_vmap_cg"].items():
            print(f"{k:20s} relative distance to ours-vmap-cg {v:.2e}")
        cfg = {"tasks": 2, "queries": 3, "reference": "ours, MINRES, 200 steps"}
        write(f"{args.name}_float64", {"config": cfg, **dist})
        return 0
    if args.impl:
        print(json.dumps(run_one(args.impl, args)))
        return 0
    impls = _names(args.impls, IMPLS, "implementation")
    mallocs = _names(args.mallocs, MALLOCS, "allocator")
    if args.interleave:
        if len(mallocs) != 1:
            raise SystemExit("peers.py: --interleave runs in one process: give one --mallocs")
        args.malloc = mallocs[0]
        with tempfile.TemporaryDirectory() as cache:  # compile from scratch
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            rows = run_interleaved(impls, args)
    else:
        rows = run_fresh_rows(impls, mallocs, args)
    add_speedups(rows, args)
    cfg = {k: v for k, v in vars(args).items() if k not in ("impl", "malloc")} | {
        "lam": LAM,
        "inner_steps": STEPS,
        "inner_lr": LR,
        "cg_steps": CG,
        "n_way": 5,
        "k_shot": 1,
    }
    write(args.name, {"config": cfg, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
