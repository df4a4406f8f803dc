"""How much of a finished run's score is its evaluation inner loop? Each run folder's
parameters are evaluated under a grid of inner steps × step sizes, on the same tasks
(one seed) of the validation split by default, so that no choice is made on test tasks.
The run's own eval.json is left as it is. Every setting scores one copy of the checkpoint,
so a run that is still training (and rewrites last.pt) is scored at one step.

    python benchmarks/eval_settings.py NAME RUN_DIR [RUN_DIR ...] --steps 16,50 --lr 0.1,0.03
        # writes docs/results/eval_settings_NAME.{json,md}
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py

from imaml.evaluate import checkpoint_path  # noqa: E402
from imaml.train import evaluate_run  # noqa: E402

from common import OUT, write  # noqa: E402


def _numbers(text: str, kind):
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise SystemExit(f"error: expected positive numbers, got {text!r}")
    return values


def _checkpoint(run: Path, checkpoint: str) -> str:
    """The file ``evaluate_run`` reads."""
    name = checkpoint_path(run, checkpoint).name
    if not (run / name).exists():
        raise SystemExit(f"error: {run} has no {name} to evaluate")
    return name


def _snapshot(run: Path, checkpoint: str, into: Path) -> Path:
    """A folder holding a copy of that checkpoint, which a run still training rewrites."""
    name = _checkpoint(run, checkpoint)
    shutil.copy2(run / name, into / name)
    return into


def grid(run: Path, *, name, steps, lrs, split, tasks, seed, checkpoint, lam=None) -> list[dict]:
    """One record per (inner steps, step size): the mean score and its 95% CI."""
    rows = []
    for k in steps:
        for lr in lrs:
            t0 = time.perf_counter()
            r = evaluate_run(
                run,
                tasks=tasks,
                split=split,
                checkpoint=checkpoint,
                seed=seed,
                eval_inner_steps=k,
                eval_inner_lr=lr,
                eval_lam=lam,
                write=False,
            )
            rows.append(
                {
                    "run": name,
                    "metric": r["metric"],
                    "inner_steps": k,
                    "inner_lr": lr,
                    "mean": r["mean"],
                    "ci95": r["ci95"],
                    "eval_inner": r["eval_inner"],
                    "checkpoint_step": r["checkpoint_step"],
                    "seconds": time.perf_counter() - t0,
                }
            )
            print(f"{name} steps {k} lr {lr}: {_score(rows[-1])}")
    return rows


def _score(r: dict) -> str:
    scale = 100.0 if r["metric"] == "accuracy" else 1.0
    return f"{scale * r['mean']:.2f} ± {scale * r['ci95']:.2f}"


def table(rows: list[dict], info: dict) -> str:
    """Markdown: one row per run and number of steps, one column per step size."""
    lrs = sorted({r["inner_lr"] for r in rows}, reverse=True)
    metric = "accuracy (%)" if rows[0]["metric"] == "accuracy" else rows[0]["metric"]
    lam = "each run's own λ" if info.get("eval_lam") is None else f"λ = {info['eval_lam']:g}"
    out = [
        f"Query {metric} (95% CI) by evaluation inner loop ({lam}), on the same "
        f"{info['tasks']} tasks of the {info['split']} split (seed {info['seed']}) in every "
        f"cell: `{info['command']}`",
        "",
        "| run | steps | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
        "|---|---|" + "---|" * len(lrs),
    ]
    for key in dict.fromkeys((r["run"], r["inner_steps"]) for r in rows):
        cell = {r["inner_lr"]: r for r in rows if (r["run"], r["inner_steps"]) == key}
        vals = [_score(cell[lr]) if lr in cell else "–" for lr in lrs]
        out.append(f"| {key[0]} | {key[1]} | " + " | ".join(vals) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name")
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--steps", default="16,50")
    p.add_argument("--lr", default="0.1")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--tasks", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", choices=("best", "last"), default="last")
    p.add_argument("--eval-lam", type=float, help="λ when evaluating (default: the run's own)")
    args = p.parse_args(argv)
    steps, lrs = _numbers(args.steps, int), _numbers(args.lr, float)
    if args.tasks < 1:
        raise SystemExit(f"error: --tasks must be >= 1, got {args.tasks}")
    if args.eval_lam is not None and args.eval_lam < 0:
        raise SystemExit(f"error: --eval-lam must be >= 0, got {args.eval_lam}")
    for run in args.runs:
        if not (run / "config.json").exists():
            raise SystemExit(f"error: {run} is not a run folder (no config.json)")
        _checkpoint(run, args.checkpoint)
    rows = []
    for run in args.runs:
        with tempfile.TemporaryDirectory() as tmp:  # one θ per run, even one still training
            rows += grid(
                _snapshot(run, args.checkpoint, Path(tmp)),
                name=run.name,
                steps=steps,
                lrs=lrs,
                split=args.split,
                tasks=args.tasks,
                seed=args.seed,
                checkpoint=args.checkpoint,
                lam=args.eval_lam,
            )
    command = "python benchmarks/eval_settings.py " + " ".join(argv or sys.argv[1:])
    info = {
        "split": args.split,
        "tasks": args.tasks,
        "seed": args.seed,
        "eval_lam": args.eval_lam,
        "command": command,
    }
    write(f"eval_settings_{args.name}", {**info, "records": rows}, OUT)
    (OUT / f"eval_settings_{args.name}.md").write_text(table(rows, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
