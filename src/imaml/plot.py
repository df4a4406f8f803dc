"""Learning curves from a run folder's metrics log (metrics.jsonl, and .gz)."""

from __future__ import annotations

import json
from pathlib import Path

from .run_folder import METRICS, METRICS_GZ, metric_lines


def read_metrics(run_dir) -> tuple[list[dict], list[dict]]:
    """The run's logged training steps and validations, in order."""
    if not any((Path(run_dir) / name).exists() for name in (METRICS, METRICS_GZ)):
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    train, val = [], []
    for line in metric_lines(run_dir):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        (val if r.get("kind") == "val" else train).append(r)
    return train, val


def _smooth(ys, k):
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= k:
            acc -= ys[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_run(run_dir, path=None) -> Path:
    """Write learning_curve.png: training query score (smoothed) and validation score vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_metrics(run_dir)
    key = "query_accuracy" if train and "query_accuracy" in train[0] else "query_loss"
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps = [r["step"] for r in train]
        ys = [r[key] for r in train]
        ax.plot(steps, ys, color="C0", alpha=0.25, lw=0.8)
        ax.plot(
            steps, _smooth(ys, max(1, len(ys) // 50)), color="C0", label=f"train {key} (smoothed)"
        )
    if val:
        ax.errorbar(
            [r["step"] for r in val],
            [r["mean"] for r in val],
            yerr=[r["ci95"] for r in val],
            color="C1",
            marker="o",
            ms=3,
            capsize=2,
            label=f"validation {val[0]['metric']} (95% CI)",
        )
    ax.set_xlabel("meta-step")
    ax.set_ylabel("accuracy" if key == "query_accuracy" else "loss")
    if key == "query_loss":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(Path(run_dir).name)
    fig.tight_layout()
    out = Path(path) if path else Path(run_dir) / "learning_curve.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
