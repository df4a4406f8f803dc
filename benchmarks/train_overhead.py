"""What a training step costs beyond its meta-step: ``imaml train``'s outer loop against
the bare meta-step on the same device, in one process.

The preset (default omniglot-5w1s: meta-batch 32, 16 inner GD steps, 5 MINRES steps) is
timed four ways, in milliseconds per meta-step:

- ``sample``: drawing one meta-batch of tasks on the host and copying it to the device;
- ``meta-step``: ``MetaStep`` (CUDA graph where it applies, ``--compile`` as given) called
  back to back on pre-drawn batches, one synchronisation at the end (throughput);
- ``meta-step+adam``: the same with Adam's update after each step;
- ``train-in-order`` and ``train-one-behind``: ``meta_train`` for ``--steps`` steps,
  reading each step's numbers before the next step starts, and reading them one step late
  (the loop's order on CUDA, ``imaml.train.reads_one_step_behind``), so that the host
  samples and logs while the device computes. The figure is the median of the run's logged
  ``step_time`` after the first ``--skip`` steps (graph capture, compilation), and
  ``mean_ms`` the mean over the same steps.

``overhead_ms`` is each row minus ``meta-step``. On a CPU the host does all the work in
turn, so the two loops should cost the same; the difference is on CUDA. (On a CPU the
one-behind loop computes step t + 1 before it logs step t, so its first logged time holds
two steps and its last almost none: compare medians there.)

    python benchmarks/train_overhead.py [--device cuda] [--steps 300] [--compile pieces]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import imaml.train as tr
from imaml import make_algorithm
from imaml.config import from_preset
from imaml.data import make_task_families
from imaml.fast import MetaStep

from common import OUT, write

LOOPS = {"in-order": False, "one-behind": True}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_rows(cfg, device: torch.device, steps: int, skip: int) -> list[dict]:
    """``sample``, ``meta-step`` and ``meta-step+adam`` as training builds them."""
    fams, _ = make_task_families(cfg, progress=False)
    model = fams["train"].make_model(torch.Generator().manual_seed(cfg.seed)).to(device)
    alg = make_algorithm(cfg.algo, model=model, loss=fams["train"].loss, **cfg.algorithm_kwargs())
    params = alg.meta_parameters(dict(model.named_parameters()))
    opt = torch.optim.Adam(params.values(), lr=cfg.outer_lr, eps=cfg.adam_eps)
    step = MetaStep(alg, mode=cfg.cuda_graph, compile=cfg.compile)
    gen = torch.Generator().manual_seed(cfg.seed)
    ts = []
    batches = []
    for _ in range(max(skip, 8)):
        t0 = time.perf_counter()
        batches.append(fams["train"].sample(cfg.meta_batch, generator=gen).to(device))
        sync(device)
        ts.append(time.perf_counter() - t0)
    rows = [{"row": "sample", "ms": 1e3 * statistics.median(ts)}]

    def run(i: int, update: bool) -> None:
        grads, _ = step(params, batches[i % len(batches)], allow_empty=True)
        if update:
            for k, p in params.items():
                p.grad = grads[k]
            opt.step()

    for name, update in (("meta-step", False), ("meta-step+adam", True)):
        t0 = time.perf_counter()
        for i in range(skip):  # capture / compilation
            run(i, update)
        sync(device)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(steps):
            run(i, update)
        sync(device)
        ms = 1e3 * (time.perf_counter() - t0) / steps
        rows.append({"row": name, "ms": ms, "warmup_s": first, "steps": steps})
    return rows


def train_row(cfg, loop: str, steps: int, skip: int) -> dict:
    real = tr.reads_one_step_behind
    tr.reads_one_step_behind = lambda device: LOOPS[loop]
    try:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            s = tr.meta_train(
                cfg.replace(meta_steps=steps + skip),
                Path(d) / "run",
                progress=False,
                final_test=False,
            )
            wall = time.perf_counter() - t0
            lines = (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()
    finally:
        tr.reads_one_step_behind = real
    times = [r["step_time"] for r in map(json.loads, lines) if r["kind"] == "train"]
    kept = times[skip:]
    return {
        "row": f"train-{loop}",
        "ms": 1e3 * statistics.median(kept),
        "mean_ms": 1e3 * statistics.fmean(kept),
        "first_steps_s": sum(times[:skip]),
        "steps": len(kept),
        "wall_s": wall,
        "cuda_graph_replays": s["cuda_graph"]["replays"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="omniglot-5w1s")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, help="timed steps per row (default 300 on CUDA, 10 on CPU)")
    p.add_argument("--skip", type=int, default=3, help="untimed first steps (capture, compile)")
    p.add_argument("--compile", default="off", choices=["off", "step", "pieces"])
    p.add_argument("--hvp-mode", default=None, choices=["rev", "fwd"])
    p.add_argument("--loops", nargs="+", default=list(LOOPS), choices=list(LOOPS))
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    steps = args.steps or (300 if device.type == "cuda" else 10)
    if steps < 1 or args.skip < 1:
        p.error("--steps and --skip must be at least 1")
    kw = {"hvp_mode": args.hvp_mode} if args.hvp_mode else {}
    cfg = from_preset(
        args.preset,
        device=args.device,
        compile=args.compile,
        val_tasks=0,
        log_every=1,
        checkpoint_every=10**9,
        **kw,
    )
    if device.type == "cpu":
        tr.setup_runtime(cfg)  # as training: subnormals flushed, freed memory kept
    rows = bare_rows(cfg, device, steps, args.skip)
    for loop in args.loops:
        rows.append(train_row(cfg, loop, steps, args.skip))
        print(json.dumps(rows[-1]), file=sys.stderr)
    base = next(r["ms"] for r in rows if r["row"] == "meta-step")
    for r in rows:
        if r["row"] != "sample":
            r["overhead_ms"] = r["ms"] - base
    for r in rows:
        print(
            f"{r['row']:>18}: {r['ms']:8.2f} ms"
            + (f"  (+{r['overhead_ms']:.2f})" if "overhead_ms" in r else "")
        )
    name = "train_overhead" + ("_cuda" if device.type == "cuda" else "_cpu")
    write(
        name,
        {
            "config": {**vars(args), "out": str(args.out), "steps": steps},
            "run_config": cfg.to_dict(),
            "rows": rows,
        },
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
