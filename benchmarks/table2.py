"""The paper's Omniglot table from our own 20,000-step runs, advanced a short allocation at a time.

Each cell (setting × algorithm) is one run folder in ``results/table2/SETTING-ALGO/``,
committed so that a run outlives the machine it ran on. An allocation picks the
unfinished cells, trains them until a deadline (several at once with ``--parallel``),
evaluates those that reach 20,000 steps on 600 test tasks of characters no training
task used, and packs what must come back (each cell's last.pt, metrics log,
config.json, machine.json, eval.json) into archives of at most 15 MiB in ``--out``.
``unpack`` checks such archives (hashes, each folder's config against its cell) and
swaps the cells in; ``status`` writes ``docs/results/table2.{json,md}``. ``run`` and
``status`` fold each idle cell's ``metrics.jsonl`` into its ``metrics.jsonl.gz``, so that
a committed log stays a few MiB however many steps it holds.

    python benchmarks/table2.py run --minutes 12 --out $OUT --parallel 4   # on the GPU
    python benchmarks/table2.py unpack $FILES/table2-*.tar.gz              # back here
    python benchmarks/table2.py status
    python benchmarks/table2.py run --minutes 120 --out /tmp/t2 --device cpu --cells omniglot-5w1s-fomaml
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = Path(os.environ.get("TABLE2_RUNS", ROOT / "results" / "table2"))
RESULTS = Path(os.environ.get("TABLE2_RESULTS", ROOT / "docs" / "results"))
SETTINGS = ("omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s")
ALGOS = ("imaml-gd", "imaml-hf", "maml", "fomaml", "reptile")
STEPS_TARGET = 20000
TEST_TASKS = 600
PACKED = (
    "config.json",
    "metrics.jsonl.gz",
    "metrics.jsonl",
    "machine.json",
    "last.pt",
    "eval.json",
)
ARCHIVE_LIMIT = 15 * 2**20
# the paper's Table 2 (docs/paper.md)
PAPER = {
    "maml": (98.7, 99.9, 95.8, 98.9),
    "fomaml": (98.3, 99.2, 89.4, 97.9),
    "reptile": (97.68, 99.48, 89.43, 97.12),
    "imaml-gd": (99.16, 99.67, 94.46, 98.69),
    "imaml-hf": (99.50, 99.74, 96.18, 99.14),
}
# settings changed only by the tests (tiny runs); empty for the real table
OVERRIDES: dict = {}


class CellError(ValueError):
    """A results folder or archive that does not fit its cell."""


def cells() -> list[str]:
    """Every cell, in the order allocations advance them: what the table needs complete
    (iMAML-GD, MAML, FOMAML, Reptile and iMAML-HF on 5w1s, then 20w1s, then iMAML on the
    5-shot settings), then the 5-shot baselines, which need only show progress. The
    learning-speed study set the iMAML presets on 2026-12-03, so iMAML goes first; the
    Reptile cells train the presets' Reptile, Nichol et al.'s protocol since 2026-12-05."""
    one_shot, five_shot = ("omniglot-5w1s", "omniglot-20w1s"), ("omniglot-5w5s", "omniglot-20w5s")
    imaml, baselines = ("imaml-gd", "imaml-hf"), ("maml", "fomaml", "reptile")
    groups = (
        (one_shot, (imaml[0], *baselines, imaml[1])),
        (five_shot, imaml),
        (five_shot, baselines),
    )
    return [f"{s}-{a}" for settings, algos in groups for s in settings for a in algos]


def split_cell(cell: str) -> tuple[str, str]:
    for s in SETTINGS:
        if cell.startswith(s + "-") and cell[len(s) + 1 :] in ALGOS:
            return s, cell[len(s) + 1 :]
    raise CellError(f"unknown cell {cell!r}; cells are SETTING-ALGO, e.g. omniglot-5w1s-maml")


def cell_config(cell: str, *, device: str = "auto"):
    from imaml.config import from_preset

    setting, algo = split_cell(cell)
    preset = setting + ("-hf" if algo == "imaml-hf" else "")
    values = dict(
        algo="imaml" if algo.startswith("imaml") else algo,
        meta_steps=STEPS_TARGET,
        val_every=2000,
        val_tasks=200,
        checkpoint_every=250,
        device=device,
    )
    return from_preset(preset, **{**values, **OVERRIDES})


# how a cell is evaluated, not what it trains: a change to these re-evaluates a finished
# cell (``pending``) and leaves its training alone
EVAL_FIELDS = ("eval_lam", "eval_inner_steps", "eval_inner_lr", "eval_inner_batch")


def eval_settings(cell: str, folder: Path) -> dict:
    """How the cell in ``folder`` is evaluated: as its preset says now, where the preset
    sets a value, else as its own config.json does (what ``evaluate_run`` then does)."""
    want, saved = cell_config(cell), json.loads((folder / "config.json").read_text())
    return {k: saved.get(k) if getattr(want, k) is None else getattr(want, k) for k in EVAL_FIELDS}


def current_eval(cell: str, folder: Path) -> dict | None:
    """The cell's eval.json if it used the cell's present evaluation settings, else None."""
    path = folder / "eval.json"
    if not path.exists():
        return None
    ev = json.loads(path.read_text())
    used = {k: ev.get("config", {}).get(k) for k in EVAL_FIELDS}
    return ev if used == eval_settings(cell, folder) else None


def check_folder(cell: str, folder: Path) -> None:
    """CellError, in one line, if ``folder``'s config is not its cell's (its training)."""
    from imaml.config import RUNTIME_FIELDS, Config

    path = folder / "config.json"
    try:
        saved = Config.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise CellError(f"{path}: not a readable run config ({e})") from None
    want = cell_config(cell)
    differ = [
        k
        for k in want.to_dict()
        if k not in RUNTIME_FIELDS + EVAL_FIELDS and getattr(saved, k) != getattr(want, k)
    ]
    if differ:
        raise CellError(
            f"{folder} does not hold cell {cell}: its config differs in {differ[:4]}; move the "
            "folder away (or out of results/table2/)"
        )


def steps_done(folder: Path) -> int:
    from imaml.checkpoint import load_checkpoint

    return load_checkpoint(folder / "last.pt")["step"] if (folder / "last.pt").exists() else 0


def pending(names: list[str] | None) -> list[str]:
    """Cells still to train (in priority order), among ``names`` if given."""
    chosen = cells() if not names else [c for c in cells() if c in names]
    for c in names or []:
        split_cell(c)
    out = []
    for c in chosen:
        folder = RUNS / c
        if folder.exists():
            check_folder(c, folder)
        if steps_done(folder) < STEPS_TARGET or current_eval(c, folder) is None:
            out.append(c)
    return out


# -- one cell: train until the deadline, evaluate when finished -----------------------
def train_cell(cell: str, deadline: float, device: str, stop_after: float | None = None) -> None:
    from imaml.train import evaluate_run, meta_train

    folder = RUNS / cell
    if folder.exists():
        check_folder(cell, folder)
    if steps_done(folder) < STEPS_TARGET:
        budget = deadline - time.time()
        if budget < 30:
            return
        if stop_after is not None:  # seconds of training (throughput), set-up not counted
            budget = min(budget, stop_after)
        cfg = cell_config(cell, device=device)
        meta_train(
            cfg,
            folder,
            resume=(folder / "last.pt").exists(),
            progress=False,
            time_budget_s=budget,
            final_test=False,
        )
    if steps_done(folder) >= STEPS_TARGET and current_eval(cell, folder) is None:
        evaluate_run(
            folder,
            tasks=TEST_TASKS,
            checkpoint="last",
            device=device,
            **eval_settings(cell, folder),
        )


def cmd_run(args) -> None:
    """Train pending cells until ``--minutes`` have passed, ``--parallel`` at a time (each
    in its own process), then pack every cell this run touched into ``--out``."""
    todo = pending(args.cells.split(",") if args.cells else None)
    deadline = time.time() + 60 * args.minutes - args.reserve
    running, touched = [], []
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if args.device == "cpu" else {})}
    while todo or running:
        while todo and len(running) < args.parallel and deadline - time.time() > 60:
            cell = todo.pop(0)
            cmd = [
                sys.executable,
                __file__,
                "cell",
                cell,
                "--deadline",
                str(deadline),
                "--device",
                args.device,
            ]
            running.append((cell, subprocess.Popen(cmd, env=env)))
            touched.append(cell)
        if not running:
            break
        time.sleep(1)
        for job in [j for j in running if j[1].poll() is not None]:
            running.remove(job)
            print(
                f"{job[0]}: exit {job[1].returncode}, step {steps_done(RUNS / job[0])}", flush=True
            )
    compress_logs(touched)
    for path in pack(touched, Path(args.out)):
        print(f"packed {path} ({path.stat().st_size / 2**20:.1f} MiB)")


# -- packing and unpacking -------------------------------------------------------------
def pack(names: list[str], out: Path) -> list[Path]:
    """Archives of at most ``ARCHIVE_LIMIT`` bytes holding ``names``' folders, each with a
    manifest of SHA-256 hashes."""
    out.mkdir(parents=True, exist_ok=True)
    groups, size = [[]], 0
    for cell in names:
        files = [RUNS / cell / f for f in PACKED if (RUNS / cell / f).exists()]
        n = sum(f.stat().st_size for f in files)
        if groups[-1] and size + n > ARCHIVE_LIMIT:
            groups.append([])
            size = 0
        groups[-1].append((cell, files))
        size += n
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = []
    for i, group in enumerate(g for g in groups if g):
        path = out / f"table2-{stamp}-{i}.tar.gz"
        manifest = {}
        with tarfile.open(path, "w:gz") as tar:
            for cell, files in group:
                for f in files:
                    name = f"{cell}/{f.name}"
                    manifest[name] = hashlib.sha256(f.read_bytes()).hexdigest()
                    tar.add(f, arcname=name)
            blob = json.dumps(manifest, indent=1).encode()
            info = tarfile.TarInfo("MANIFEST.json")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        paths.append(path)
    return paths


def unpack(archive: Path) -> list[str]:
    """Swap the archive's cells into ``RUNS`` once every file checks out; nothing changes
    otherwise. A cell is never moved back to fewer steps."""
    RUNS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=RUNS, prefix=".incoming-") as tmp:
        tmp = Path(tmp)
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = tar.getmembers()
                if any(
                    m.name.startswith(("/", "..")) or ".." in Path(m.name).parts for m in members
                ):
                    raise CellError(f"{archive}: unsafe paths in the archive")
                tar.extractall(tmp, filter="data")
        except (OSError, tarfile.TarError, EOFError) as e:
            raise CellError(
                f"{archive} is not a complete table2 archive ({e}); nothing changed"
            ) from None
        manifest = _manifest(archive, tmp)
        names = sorted({n.split("/")[0] for n in manifest})
        for cell in names:
            split_cell(cell)
            check_folder(cell, tmp / cell)
            old, new = steps_done(RUNS / cell), steps_done(tmp / cell)
            if new < old:
                raise CellError(
                    f"{archive}: {cell} is at step {new}, results/table2 at {old}; nothing changed"
                )
        for cell in names:
            final, stale = RUNS / cell, RUNS / f".old-{cell}"
            if final.exists():
                final.rename(stale)
            (tmp / cell).rename(final)
            shutil.rmtree(stale, ignore_errors=True)
    return names


def _manifest(archive: Path, folder: Path) -> dict:
    path = folder / "MANIFEST.json"
    if not path.exists():
        raise CellError(f"{archive} has no MANIFEST.json; nothing changed")
    manifest = json.loads(path.read_text())
    for name, digest in manifest.items():
        f = folder / name
        if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != digest:
            raise CellError(f"{archive}: {name} is missing or corrupt; nothing changed")
    return manifest


# -- the table --------------------------------------------------------------------------
def row(cell: str) -> dict:
    setting, algo = split_cell(cell)
    folder = RUNS / cell
    ev = current_eval(cell, folder)  # None also when the preset now evaluates otherwise
    times, device = [r["step_time"] for r in _records(folder, "train")], None
    if (folder / "machine.json").exists():  # every machine the cell ran on, in order
        runs = json.loads((folder / "machine.json").read_text())["runs"]
        names = [m.get("gpu") or m.get("cpu_model") or m.get("cpu") for m in runs]
        device = " + ".join(dict.fromkeys(n for n in names if n)) or None
    return {
        "setting": setting,
        "algo": algo,
        "steps_done": steps_done(folder),
        "steps_target": STEPS_TARGET,
        "test_acc": None if ev is None else ev["mean"],
        "ci95": None if ev is None else ev["ci95"],
        "test_tasks": None if ev is None else ev["tasks"],
        "disjoint_test_classes": True if ev is None else ev.get("disjoint_test_classes", True),
        "paper_acc": PAPER[algo][SETTINGS.index(setting)],
        "device": device,
        "s_per_step": statistics.median(times) if times else None,
    }


def _records(folder: Path, kind: str) -> list[dict]:
    """The metrics log's records of ``kind`` ("train", "val") in a cell's folder."""
    from imaml.plot import read_metrics

    try:
        return read_metrics(folder)[kind == "val"]
    except FileNotFoundError:
        return []


def compress_logs(names: list[str]) -> None:
    """Fold each cell's ``metrics.jsonl`` into its ``metrics.jsonl.gz`` (not while a run
    holds the folder), the form committed and packed."""
    from imaml.run_folder import compress_metrics

    for cell in names:
        if (RUNS / cell).is_dir():
            compress_metrics(RUNS / cell)


def validation(cell: str) -> list[dict]:
    """The cell's own validation during training: step, accuracy, 95% CI, tasks."""
    keys = ("step", "mean", "ci95", "tasks")
    return [{k: r[k] for k in keys} for r in _records(RUNS / cell, "val")]


def cmd_status(args) -> None:
    compress_logs(cells())
    rows = [row(c) for c in cells()]
    curves = {c: v for c in cells() if (v := validation(c))}
    times = _step_times()
    left = [
        (r, times.get(f"{r['setting']}-{r['algo']}"))
        for r in rows
        if r["steps_done"] < STEPS_TARGET
    ]
    minutes = sum((STEPS_TARGET - r["steps_done"]) * t / 60 for r, t in left if t is not None)
    payload = {
        "command": "python benchmarks/table2.py status",
        "cells": rows,
        "gpu_s_per_step": times,
        "gpu_minutes_needed": round(minutes, 1) if all(t is not None for _, t in left) else None,
        "gpu_minutes_needed_timed_cells": round(minutes, 1),
        "validation": curves,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "table2.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / "table2.md").write_text(markdown(rows, payload))
    print(markdown(rows, payload))


def _step_times() -> dict:
    """GPU seconds per meta-step by cell, from ``table2_gpu_times.json`` (``time``)."""
    path = RESULTS / "table2_gpu_times.json"
    return json.loads(path.read_text())["s_per_step"] if path.exists() else {}


def markdown(rows: list[dict], payload: dict) -> str:
    def fmt(r):
        if r["test_acc"] is not None:
            return f"{100 * r['test_acc']:.2f} ± {100 * r['ci95']:.2f}"
        # trained, but not evaluated (or evaluated before its preset's evaluation changed)
        return "– (to evaluate: `run`)" if r["steps_done"] >= STEPS_TARGET else "–"

    lines = [
        "# The paper's Table 2, our runs beside it",
        "",
        "Generated by `python benchmarks/table2.py status` from `table2.json`. Test accuracy (%)",
        "on 600 tasks of characters no training task used, 95% CI; a cell is the full schedule",
        'only at 20,000 meta-steps. "steps" is how far our run has come.',
        "",
        "| setting | algorithm | ours | steps | paper | device |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        full = "" if r["steps_done"] >= STEPS_TARGET else " (not full)"
        lines.append(
            f"| {r['setting']} | {r['algo']} | {fmt(r)}{full if r['test_acc'] is not None else ''} "
            f"| {r['steps_done']:,} / {STEPS_TARGET:,} | {r['paper_acc']} | {r['device'] or '–'} |"
        )
    need = payload["gpu_minutes_needed"]
    lines += [
        "",
        f"GPU minutes still needed: {'not yet timed for every cell' if need is None else need}.",
        "",
        *validation_table(payload["validation"]),
        "The Reptile cells train Nichol et al.'s protocol, whose figures are the paper's row,",
        "with plain inner steps in place of their Adam: [docs/reproduction.md](../reproduction.md#the-papers-table-one-short-allocation-at-a-time).",
    ]
    return "\n".join(lines) + "\n"


def validation_table(curves: dict[str, list[dict]]) -> list[str]:
    """Markdown lines: each started cell's own validation accuracy (%) by meta-step."""
    if not curves:
        return []
    steps = sorted({v["step"] for vals in curves.values() for v in vals})
    tasks = sorted({v["tasks"] for vals in curves.values() for v in vals})
    ci = max(v["ci95"] for vals in curves.values() for v in vals)
    lines = [
        "Validation during training, with each cell's own evaluation (% on "
        f"{' or '.join(map(str, tasks))} tasks of the validation characters, 95% CI at most "
        f"±{100 * ci:.1f}; `metrics.jsonl`). It used the evaluation settings the cell was "
        "trained with (`config.json`); the test figure above uses the preset's present ones "
        "(`eval.json`):",
        "",
        "| cell | " + " | ".join(f"{s:,}" for s in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for cell, vals in curves.items():
        at = {v["step"]: f"{100 * v['mean']:.1f}" for v in vals}
        lines.append(f"| {cell} | " + " | ".join(at.get(s, "–") for s in steps) + " |")
    return [*lines, ""]


def cmd_time(args) -> None:
    """Seconds per meta-step of each cell on this device, as its training runs it (the
    median of ``--steps`` steps after the first few, compilation excluded), into
    ``docs/results/table2_gpu_times.json``: what ``status`` turns into GPU minutes."""
    from imaml.machine import machine_info
    from imaml.train import meta_train

    path = RESULTS / "table2_gpu_times.json"
    data = json.loads(path.read_text()) if path.exists() else {"s_per_step": {}, "machines": {}}
    for cell in args.cells.split(",") if args.cells else cells():
        split_cell(cell)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = cell_config(cell, device=args.device).replace(val_tasks=0)
            meta_train(cfg, tmp, progress=False, final_test=False, max_steps_this_run=args.steps)
            lines = (Path(tmp) / "metrics.jsonl").read_text().splitlines()
            times = [json.loads(line)["step_time"] for line in lines][args.warmup :]
        data["s_per_step"][cell] = statistics.median(times)
        data["machines"][cell] = machine_info()
        print(f"{cell}: {1000 * data['s_per_step'][cell]:.1f} ms per meta-step", flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps({"command": "python benchmarks/table2.py time", **data}, indent=1)
        )


def cmd_throughput(args) -> None:
    """Meta-steps per second across ``--parallel`` cells trained at once (one process each,
    as ``run`` does), against the first cell trained alone, each for ``--seconds`` of
    training in scratch folders (the table's runs are not touched). The ratio is what one
    allocation gains by advancing several cells (target: >= 3 on a GPU)."""
    from imaml.machine import machine_info

    names = (args.cells.split(",") if args.cells else cells())[: args.parallel]
    for c in names:
        split_cell(c)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, group in (("alone", names[:1]), ("together", names)):
            runs = Path(tmp) / label
            env = {**os.environ, "TABLE2_RUNS": str(runs), "PYTHONUNBUFFERED": "1"}
            deadline = time.time() + args.seconds + 120  # set-up and compilation excluded below
            procs = [
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "cell",
                        c,
                        "--deadline",
                        str(deadline),
                        "--device",
                        args.device,
                        "--stop-after",
                        str(args.seconds),
                    ],
                    env=env,
                )
                for c in group
            ]
            for proc in procs:
                proc.wait()
            rates = {}
            for c in group:
                lines = (runs / c / "metrics.jsonl").read_text().splitlines()
                times = [json.loads(line)["step_time"] for line in lines][args.warmup :]
                rates[c] = len(times) / sum(times) if times else 0.0
            out[label] = rates
    alone = out["alone"][names[0]]
    total = sum(out["together"].values())
    payload = {
        "command": "python benchmarks/table2.py throughput " + " ".join(sys.argv[2:]),
        "cells": names,
        "steps_per_s_alone": alone,
        "steps_per_s_together": out["together"],
        "ratio": total / alone if alone else None,
        "machine": machine_info(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "table2_throughput.json").write_text(json.dumps(payload, indent=1))
    print(
        f"{len(names)} cells together: {total:.2f} meta-steps/s, {payload['ratio']:.2f}x one alone "
        f"({alone:.2f}/s)"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train pending cells until a deadline, then pack them")
    r.add_argument("--minutes", type=float, required=True)
    r.add_argument("--out", required=True, help="folder for the archives that come back")
    r.add_argument("--device", default="auto")
    r.add_argument("--parallel", type=int, default=1, help="cells trained at once")
    r.add_argument("--cells", help="comma-separated cells (default: every pending one)")
    r.add_argument("--reserve", type=float, default=45, help="seconds kept for packing")
    c = sub.add_parser("cell", help="one cell until --deadline (what 'run' starts)")
    c.add_argument("cell")
    c.add_argument("--deadline", type=float, required=True)
    c.add_argument("--device", default="auto")
    c.add_argument("--stop-after", type=float, help="seconds of training at most")
    h = sub.add_parser("throughput", help="meta-steps per second, cells together vs one alone")
    h.add_argument("--cells", help="comma-separated cells (default: the first ones)")
    h.add_argument("--parallel", type=int, default=4)
    h.add_argument("--seconds", type=float, default=60)
    h.add_argument("--warmup", type=int, default=5, help="first steps left out (compilation)")
    h.add_argument("--device", default="auto")
    u = sub.add_parser("unpack", help="swap archived cells into results/table2/")
    u.add_argument("archives", nargs="+")
    sub.add_parser("status", help="write docs/results/table2.{json,md}")
    t = sub.add_parser("time", help="seconds per meta-step of each cell on this device")
    t.add_argument("--cells", help="comma-separated cells (default: all)")
    t.add_argument("--device", default="auto")
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--warmup", type=int, default=5, help="first steps left out (compilation)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "run":
            cmd_run(args)
        elif args.cmd == "cell":
            train_cell(args.cell, args.deadline, args.device, args.stop_after)
        elif args.cmd == "throughput":
            cmd_throughput(args)
        elif args.cmd == "time":
            cmd_time(args)
        elif args.cmd == "unpack":
            for a in args.archives:
                print(f"{a}: {', '.join(unpack(Path(a)))}")
        else:
            cmd_status(args)
    except ValueError as e:
        print(f"table2: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
