"""The query gradient of 32 tasks under vmap, or task by task, by query images per task.

What ``imaml.fast.QUERY_PER_TASK`` is chosen from: on the solve path of the
compiled pieces, the query gradient v = ∇L(φ) (and the query loss and accuracy) of the
omniglot network at 32 tasks' own parameters, compiled (inductor, as ``MetaStep`` does on
the CPU), either

- ``vmap``: one program over all tasks; each convolution is one grouped convolution;
- ``per-task``: a one-task program called once per task (dense convolutions), the
  outputs stacked (``imaml.fast.make_pieces(query_per_task=...)``).

For each number of query images per class (5-way, so 5× that per task), each of
``--processes`` fresh processes times both ``--repeats`` times, alternating, and reports
medians and quartiles; the two agree to float32 rounding (checked). Fresh processes,
because the per-task program's speed differs from one process to the next on this
machine (it runs 32 times as many, smaller, parallel regions). Freed memory is kept, as
``imaml train`` does. Writes docs/results/query_per_task.{json,png}.

    python benchmarks/query_per_task.py [--queries 1 2 3 4 5 6 8 10 15] [--processes 2]
        [--repeats 25]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from common import OUT, run_fresh, write

TASKS = 32


def run_one(queries: int, repeats: int) -> dict:
    from torch.func import grad_and_value, vmap

    from imaml import keep_freed_memory
    from imaml.fast import CPU_PIECES_OPTIONS
    from imaml.models import OmniglotConvNet
    from imaml.params import detach

    from peers import data, peer_algorithm

    keep_freed_memory()
    torch.set_flush_denormal(True)
    g = torch.Generator().manual_seed(0)
    model = OmniglotConvNet(5, generator=g)
    alg = peer_algorithm(model, solver="cg")
    _, _, qx, qy = data(TASKS, queries, g)
    theta = detach(dict(model.named_parameters()))
    noise = lambda v: 0.01 * torch.randn(TASKS, *v.shape, generator=g)
    phi = {k: (v.expand(TASKS, *v.shape) + noise(v)).contiguous() for k, v in theta.items()}

    def query(p, x, y):
        return grad_and_value(lambda q: alg.loss_and_metric(q, x, y), has_aux=True)(p)

    compile = lambda f: torch.compile(f, dynamic=False, options=CPU_PIECES_OPTIONS)
    batched = compile(lambda p, x, y: vmap(query)(p, x, y))
    one = compile(query)

    def per_task(p, x, y):
        outs = [one({k: t[i] for k, t in p.items()}, x[i], y[i]) for i in range(TASKS)]
        return {k: torch.stack([o[0][k] for o in outs]) for k in p}

    a, b = batched(phi, qx, qy)[0], per_task(phi, qx, qy)  # compile both
    num = sum(((a[k] - b[k]) ** 2).sum() for k in a)
    rel = float((num / sum((a[k] ** 2).sum() for k in a)).sqrt())
    times = {"vmap": [], "per-task": []}
    for _ in range(repeats):
        for name, f in (("vmap", batched), ("per-task", per_task)):
            t0 = time.perf_counter()
            f(phi, qx, qy)
            times[name].append(time.perf_counter() - t0)
    row = {"queries_per_class": queries, "images_per_task": 5 * queries, "rel_diff": rel}
    for name, ts in times.items():
        q1, med, q3 = statistics.quantiles(ts, n=4)
        row[name] = {"median_ms": 1e3 * med, "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3}
    return row


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ok = [r for r in rows if "vmap" in r]
    for name, color, dx in (("vmap", "tab:blue", -0.4), ("per-task", "tab:orange", 0.4)):
        x = [r["images_per_task"] + dx for r in ok]
        y = [r[name]["median_ms"] / r["images_per_task"] for r in ok]
        ax.scatter(x, y, color=color, s=14, label=name)
    from imaml.fast import QUERY_PER_TASK

    least = QUERY_PER_TASK["cpu"]
    ax.axvline(least, color="gray", ls="--", lw=0.8)
    ax.text(least + 1, 0.3, f"task by task from {least} on (QUERY_PER_TASK)", fontsize=7)
    ax.set_xlabel("query images per task (32 tasks)")
    ax.set_ylabel("ms per query image (median)")
    ax.set_ylim(bottom=0)
    ax.set_title("compiled query gradient, omniglot network, 2 CPU cores", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8, 10, 15])
    ap.add_argument("--processes", type=int, default=2, help="fresh processes per point")
    ap.add_argument("--repeats", type=int, default=25, help="timed calls of each, alternating")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.repeats)))
        return 0
    if min(args.queries) < 1 or args.processes < 1 or args.repeats < 4:
        ap.error("--queries must be >= 1, --processes >= 1 and --repeats >= 4")
    rows = []
    for q in args.queries:
        for _ in range(args.processes):
            cmd = [sys.executable, __file__, "--one", str(q), "--repeats", str(args.repeats)]
            r = run_fresh(cmd)
            rows.append({"queries_per_class": q, **r})
            if "error" in r:
                print(f"{q:3d} query images / class: failed: {r['error']}", flush=True)
                continue
            print(
                f"{5 * q:4d} images / task: vmap {r['vmap']['median_ms']:6.1f} ms, "
                f"per task {r['per-task']['median_ms']:6.1f} ms (rel diff {r['rel_diff']:.1e})",
                flush=True,
            )
    cfg = vars(args) | {"tasks": TASKS, "n_way": 5, "threads": torch.get_num_threads()}
    cfg.pop("one")
    write("query_per_task", {"config": cfg, "rows": rows})
    if any("vmap" in r for r in rows):
        plot(rows, OUT / "query_per_task.png")
    return 0 if all("vmap" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
