"""Compare training runs: validation score vs meta-step and vs training wall-clock, one PNG + JSON.

Wall-clock is the running sum of each run's per-step times (validation excluded), so
runs are compared on training compute. The summary records, per run, the steps done,
the median seconds per meta-step, the best validation score and the 600-task test
result if ``eval-600.json`` (or ``eval.json``) is present.

    python benchmarks/compare_runs.py NAME RUN_DIR [RUN_DIR ...]   # writes docs/results/NAME.{json,png}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from imaml.plot import read_metrics

from common import OUT, write


def summarize(run: Path) -> dict:
    train, val = read_metrics(run)
    clock, t = {}, 0.0
    for r in train:
        t += r["step_time"]
        clock[r["step"]] = t
    cfg = json.loads((run / "config.json").read_text())
    out = {
        "run": run.name,
        "algo": cfg["algo"],
        "inner_solver": cfg["inner_solver"],
        "steps": train[-1]["step"] if train else 0,
        "median_seconds_per_step": statistics.median(r["step_time"] for r in train)
        if train
        else None,
        "training_seconds": t,
        "val": [
            {
                "step": r["step"],
                "seconds": clock.get(r["step"]),
                "mean": r["mean"],
                "ci95": r["ci95"],
            }
            for r in val
        ],
        "config": cfg,
    }
    if val:
        best = max(val, key=lambda r: r["mean"])
        out["best_val"] = {"step": best["step"], "mean": best["mean"], "ci95": best["ci95"]}
    for name in ("eval-600.json", "eval.json"):
        if (run / name).exists():
            e = json.loads((run / name).read_text())
            out["test"] = {
                k: e[k]
                for k in ("metric", "mean", "ci95", "tasks", "checkpoint", "checkpoint_step")
            }
            break
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("name")
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args(argv)
    rows = [summarize(r) for r in args.runs]
    write(args.name, {"runs": rows})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in rows:
        label = f"{r['run']} ({r['median_seconds_per_step']:.2f} s/step)"
        v = r["val"]
        a1.errorbar(
            [x["step"] for x in v],
            [x["mean"] for x in v],
            yerr=[x["ci95"] for x in v],
            marker="o",
            ms=3,
            capsize=2,
            label=label,
        )
        a2.plot(
            [x["seconds"] / 60 for x in v], [x["mean"] for x in v], marker="o", ms=3, label=label
        )
    a1.set_xlabel("meta-step")
    a2.set_xlabel("training wall-clock (minutes, 2 CPU cores)")
    tasks = sorted({r["config"]["val_tasks"] for r in rows})
    a1.set_ylabel(f"validation accuracy ({'/'.join(map(str, tasks))} tasks, 95% CI)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a1.legend(fontsize=8)
    fig.suptitle(args.name)
    fig.tight_layout()
    fig.savefig(OUT / f"{args.name}.png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
