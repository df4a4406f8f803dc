"""The ``imaml`` command: train, eval, presets, plot. The only module that reads argv."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import fields

from .config import (
    IMAML_SETTINGS,
    PRESET_NOTES,
    PRESETS,
    REPTILE_SETTINGS,
    RUNTIME_FIELDS,
    Config,
    ConfigError,
    check_applies,
    from_preset,
)

HELP = {
    "task": "task family: omniglot, miniimagenet or sinusoid",
    "algo": "meta-learning algorithm: imaml, maml (backprop through the inner loop), fomaml, reptile",
    "n_way": "classes per task (N)",
    "k_shot": "support examples per class (K)",
    "k_query": "query examples per class (Q); default: K, as in the paper",
    "train_shots": "support examples per class in meta-training tasks (default: K); "
    "validation and test tasks keep K. Nichol et al.'s Reptile trains with 10",
    "split": "omniglot class split: paper (1623 pooled, 1200/423, disjoint), background "
    "(alphabets), or authors (the authors' release's two permutations: 310 of the 423 test "
    "characters are training characters, as there; every eval.json records the overlap)",
    "split_seed": "seed of the class permutation of the split (recorded in checkpoints)",
    "val_classes": "classes held out of meta-training for validation / model selection",
    "data_dir": "folder holding omniglot/ (or miniimagenet/); default $IMAML_DATA_DIR, "
    "else ~/.cache/imaml/data (downloaded there if missing)",
    "lam": "λ, strength of the proximal term (λ/2)‖φ−θ‖²; imaml: 0.5 on the Omniglot GD "
    "presets, else 2; baselines: 0",
    "inner_steps": "inner optimiser steps per task",
    "inner_lr": "inner optimiser step size α",
    "inner_solver": "inner optimiser: gd, momentum, adam, newton_cg (the paper's Hessian-free), lbfgs",
    "inner_tol": "stop a task's inner loop once ‖∇G(φ)‖ ≤ this (0: always run --inner-steps)",
    "inner_batch": "support examples per inner step (gd, momentum, adam): each step takes the "
    "next mini-batch of a fixed pseudo-random order of the support set, a new order each "
    "epoch (default: all of it; Nichol et al.'s Reptile: 10)",
    "inner_cg_steps": "CG steps per Newton direction for --inner-solver newton_cg (paper: 5)",
    "learn_lam": "learn λ (imaml): none, scalar, or per_tensor (one λ per parameter tensor)",
    "variant": "inner loop: paper (proximal term in every step) or reference_code "
    "(the authors' release: plain steps, then one proximal pull-back); default paper, "
    "reference_code on the Omniglot GD presets",
    "cg_steps": "steps of the meta-gradient linear solver, CG or MINRES alike (Hessian-vector "
    "products per task); --cg-steps is the same option",
    "solver": "linear solver for (I + H/λ)g = ∇L: minres (sound for indefinite H), cg "
    "(truncated at negative curvature), neumann, exact (dense, small models); default minres, "
    "cg (with --curvature ggn) on the Omniglot GD presets",
    "cg_damping": "operator (1+cg_damping)I + H/(λ+lam_damping); the authors' code uses 1",
    "lam_damping": "see --cg-damping; the authors' code uses 10",
    "hvp_mode": "Hessian-vector products: rev (reverse-over-reverse), fwd "
    "(forward-over-reverse), or auto (default: fwd where the meta-step runs as compiled "
    "pieces on CUDA, measured faster there; rev otherwise)",
    "curvature": "curvature in the implicit system: hessian (the paper's I + H/λ) or ggn "
    "(the generalised Gauss-Newton matrix G = JᵀH_ℓJ, positive semi-definite for "
    "cross-entropy and squared error, so I + G/λ is positive definite and CG is sound); "
    "with --inner-solver newton_cg also the curvature of its Newton steps",
    "meta_batch": "tasks per meta-step (B)",
    "meta_steps": "outer (meta) steps in total",
    "outer_optim": "outer optimiser: adam (default) or sgd (plain steps; Reptile's meta-step "
    "θ ← θ + ε(φ̄ − θ) with ε = --outer-lr)",
    "outer_lr": "learning rate of the outer loop",
    "outer_lr_final": "decay --outer-lr linearly to this over --decay-steps, then hold it "
    "(default: constant; Nichol et al.'s Reptile: 1 → 0)",
    "decay_steps": "meta-steps of the --outer-lr-final decay (default: --meta-steps when the run "
    "is created; kept when it is resumed)",
    "adam_eps": "Adam epsilon of the outer loop",
    "seed": "seed of the model initialisation and of task sampling",
    "eval_lam": "λ used when evaluating (default: as in training; the authors use 0)",
    "eval_inner_steps": "inner steps when evaluating (default: as in training)",
    "eval_inner_lr": "inner step size when evaluating (default: as in training)",
    "eval_inner_batch": "support examples per inner step when evaluating (default: as in "
    "training; a batch as large as the support set uses all of it)",
    "val_every": "validate every N meta-steps (best checkpoint kept by validation score)",
    "val_tasks": "validation tasks per validation (0 disables validation)",
    "test_tasks": "test tasks of the final evaluation (paper: 600)",
    "checkpoint_every": "write last.pt every N meta-steps",
    "dist_timeout": "under torchrun: seconds a rank waits for the others (rendezvous, collectives) "
    "before the job fails with an error",
    "max_skip_frac": "stop with an error when more than this fraction of tasks over the last 20 "
    "meta-steps had a non-finite loss or meta-gradient (such tasks are dropped from the mean)",
    "log_every": "write a metrics.jsonl line every N meta-steps",
    "device": "auto (CUDA when available), cpu or cuda[:N]",
    "dtype": "float32 or float64",
    "threads": "CPU threads for PyTorch (default: PyTorch's choice)",
    "batched": "vmap over the tasks of a meta-batch (--no-batched: per-task loop, the reference path)",
    "flat": "auto, on or off: on the batched path carry the network's tensors as one flat "
    "vector, so each element-wise step is one kernel instead of one per tensor (same math; "
    "auto: on CUDA, where it is faster; on 2 CPU cores it is slower)",
    "task_chunk": "vmap over at most N tasks at a time: bounds peak memory at some speed "
    "(with --compile pieces: the pieces take N tasks at a time; default: the whole "
    "meta-batch at once)",
    "cuda_graph": "auto, on or off: on CUDA, capture the whole meta-step (inner loop, linear "
    "solve, query gradient) once as a CUDA graph and replay it (auto: when on CUDA and batched; "
    "falls back to eager if capture fails)",
    "compile": "torch.compile the meta-step (inductor; needs a C++ compiler on CPU, Triton on "
    "CUDA): auto (default: pieces where they apply for schedules of 5,000 meta-steps or more "
    "on CUDA, 1,000 or more on the CPU, where they repay their compilation; otherwise off; "
    "a failed compilation or graph capture then warns and falls back: a failed solve piece "
    "to one compiled Hessian-vector product per solver step, else to the uncompiled step), off, step (a "
    "bare --compile: the whole step as one program; compiles for 5-8 minutes on 2 CPU cores "
    "for omniglot-5w1s, then 1.35-1.9x faster steps there) or pieces (iMAML with gd: one "
    "inner step, the query gradient and the whole linear solve, each compiled once and "
    "reused by the loops; compiles in under 3 minutes on an H200, where it halves the "
    "meta-step, or on 2 CPU cores, where training steps are then 1.42x faster); "
    "an explicit mode that "
    "fails to compile is an error. See benchmarks/cpu_variants.py and benchmarks/gpu_step.py",
    "cpu_malloc": "keep (default) or system: on the CPU, let glibc's malloc keep freed memory "
    "for reuse, so the meta-step's large tensors are not page-faulted in afresh every step "
    "(same numbers; resident memory stays at its peak; benchmarks/peers.py); system: "
    "glibc's defaults",
}


def _type_of(f):
    t = str(f.type)
    if "bool" in t:
        return "bool"
    if "int" in t:
        return int
    if "float" in t:
        return float
    return str


def _add_config_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration (defaults come from the preset)")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        typ = _type_of(f)
        if typ == "bool":
            g.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=HELP[f.name]
            )
        elif f.name == "compile":  # a bare --compile compiles the whole step
            g.add_argument(
                flag, nargs="?", const="step", default=None, metavar="MODE", help=HELP[f.name]
            )
        elif f.name == "cg_steps":  # the steps of whichever linear solver; the old name stays
            g.add_argument(
                "--solver-steps",
                flag,
                dest=f.name,
                type=int,
                default=None,
                metavar="STEPS",
                help=HELP[f.name],
            )
        else:
            g.add_argument(flag, type=typ, default=None, metavar=f.name.upper(), help=HELP[f.name])


def _overrides(args) -> dict:
    return {
        f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None
    }


def _preset_for(args) -> str:
    if args.preset:
        return args.preset
    task = args.task or "omniglot"
    return {
        "omniglot": "omniglot-5w1s",
        "miniimagenet": "miniimagenet-5w1s",
        "sinusoid": "sinusoid",
    }[task]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imaml",
        description="Meta-learning with implicit gradients (iMAML) and its baselines: MAML, "
        "first-order MAML, Reptile.",
        epilog="Run 'imaml COMMAND --help' for the options of each command.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="meta-train a model",
        description=(
            "Meta-train on a preset (default: omniglot-5w1s, the paper's iMAML-GD settings); any "
            "option below overrides the preset. Writes config.json, metrics.jsonl, last.pt, "
            "best.pt, learning_curve.png and machine.json (what it ran on) into --out, then "
            "evaluates on the test split (eval.json)."
        ),
    )
    t.add_argument("--preset", metavar="NAME", help=f"start from this preset: {', '.join(PRESETS)}")
    t.add_argument("--out", help="run folder (default: runs/PRESET-ALGO)")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last.pt (its saved config is used; "
        "--meta-steps may extend it)",
    )
    t.add_argument(
        "--time-budget",
        type=float,
        metavar="MINUTES",
        help="stop (with a checkpoint) after this many minutes of training",
    )
    t.add_argument("--no-test", action="store_true", help="skip the final test evaluation")
    t.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    t.add_argument(
        "--config",
        metavar="FILE.json",
        help="a JSON object of config values (e.g. a run's config.json) applied over the preset; "
        "command-line options win; unknown keys are an error",
    )
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_options(t)

    _add_eval(sub)
    sub.add_parser(
        "presets",
        help="list the presets and their values",
        description="List every preset with the values it sets.",
    )

    pl = sub.add_parser(
        "plot",
        help="redraw a run's learning curve",
        description="Redraw RUN_DIR/learning_curve.png from metrics.jsonl.",
    )
    pl.add_argument("run_dir", metavar="RUN_DIR")
    return p


def _add_eval(sub) -> None:
    """The ``imaml eval`` command and its options."""
    e = sub.add_parser(
        "eval",
        help="evaluate a trained run on test tasks",
        description=(
            "Adapt to each test task with the run's inner loop and report the mean query score with "
            "a 95% confidence interval (1.96·σ/√n). Writes RUN_DIR/eval.json."
        ),
    )
    e.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by 'imaml train'")
    e.add_argument(
        "--tasks",
        type=int,
        default=None,
        help="number of tasks (default: the run's test_tasks, 600 on the presets)",
    )
    e.add_argument("--split", choices=["test", "val"], default="test", help="which classes")
    e.add_argument(
        "--checkpoint",
        choices=["best", "last"],
        default="best",
        help="best (by validation; falls back to last) or last parameters",
    )
    e.add_argument("--seed", type=int, default=None, help="seed of the sampled test tasks")
    e.add_argument("--eval-lam", type=float, help=HELP["eval_lam"])
    e.add_argument("--eval-inner-steps", type=int, help=HELP["eval_inner_steps"])
    e.add_argument("--eval-inner-lr", type=float, help=HELP["eval_inner_lr"])
    e.add_argument("--eval-inner-batch", type=int, help=HELP["eval_inner_batch"])
    e.add_argument("--data-dir", help=HELP["data_dir"])
    e.add_argument("--device", help=HELP["device"])
    e.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (metric, mean, ci95, tasks, config, ...)",
    )
    e.add_argument("--quiet", action="store_true", help="no progress bar")


def read_config_file(path: str) -> dict:
    """A JSON object of config values; ConfigError for anything else."""
    from pathlib import Path

    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(Config)} | {"conv"}  # conv: older configs (Config.from_dict)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config file {p}: unknown keys {unknown}")
    return data


def cmd_train(args) -> int:
    from .train import meta_train

    preset = _preset_for(args)
    overrides = (
        {**read_config_file(args.config), **_overrides(args)} if args.config else _overrides(args)
    )
    out = args.out or f"runs/{preset}-{overrides.get('algo', 'imaml')}"
    if args.resume:
        from .checkpoint import load_checkpoint

        saved = Config.from_dict(load_checkpoint(f"{out}/last.pt")["config"])
        changed = sorted(
            k for k, v in overrides.items() if k not in RUNTIME_FIELDS and getattr(saved, k) != v
        )
        if changed:
            raise ConfigError(
                f"--resume continues the saved run; these options differ from it: {changed} "
                f"(only {', '.join(RUNTIME_FIELDS)} may change)"
            )
        cfg = saved.replace(**{k: v for k, v in overrides.items() if k in RUNTIME_FIELDS})
    else:
        cfg = from_preset(preset, **overrides)
        check_applies(cfg.algo, _overrides(args))  # a --config file may hold every field
    budget = None if args.time_budget is None else 60.0 * args.time_budget
    if budget is not None and budget <= 0:
        raise ConfigError(f"--time-budget must be > 0 minutes, got {args.time_budget}")
    summary = meta_train(
        cfg,
        out,
        resume=args.resume,
        progress=not args.quiet,
        time_budget_s=budget,
        final_test=not args.no_test,
        tensorboard=args.tensorboard,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports
    compiled = summary["compile"]
    how = "" if compiled["mode"] == "off" else f", torch.compile {compiled['mode']}"
    if compiled["fallback"]:
        how = f", uncompiled after torch.compile {compiled['mode']} failed"
    print(
        f"{summary['step']}/{summary['meta_steps']} meta-steps in {summary['seconds']:.0f} s "
        f"({summary['seconds_per_step']:.3f} s/step{how}); run folder: {out}"
    )
    if summary["stopped_by"]:
        print(
            f"stopped by {summary['stopped_by']}; continue with: imaml train --out {out} --resume"
        )
    if "test" in summary:
        r = summary["test"]
        scale = 100.0 if r["metric"] == "accuracy" else 1.0
        unit = "%" if r["metric"] == "accuracy" else ""
        print(
            f"test {r['metric']}: {scale * r['mean']:.2f}{unit} ± {scale * r['ci95']:.2f}{unit} "
            f"(95% CI, {r['tasks']} tasks, {r['checkpoint']} from step {r['checkpoint_step']})"
        )
    return 0


def cmd_eval(args) -> int:
    from .train import evaluate_run

    if args.tasks is not None and args.tasks < 1:
        raise ConfigError(f"--tasks must be >= 1, got {args.tasks}")
    res = evaluate_run(
        args.run_dir,
        tasks=args.tasks,
        split=args.split,
        checkpoint=args.checkpoint,
        progress=not (args.quiet or args.json),
        seed=args.seed,
        eval_lam=args.eval_lam,
        eval_inner_steps=args.eval_inner_steps,
        eval_inner_lr=args.eval_inner_lr,
        eval_inner_batch=args.eval_inner_batch,
        data_dir=args.data_dir,
        device=args.device,
    )
    if args.json:
        print(json.dumps(res))
    else:
        scale = 100.0 if res["metric"] == "accuracy" else 1.0
        print(
            f"{res['split']} {res['metric']}: {scale * res['mean']:.2f} ± {scale * res['ci95']:.2f} "
            f"(95% CI over {res['tasks']} tasks)"
        )
    return 0


def cmd_presets(args) -> int:
    for name, values in PRESETS.items():
        cfg = from_preset(name)
        print(f"{name}:")
        for k, v in values.items():
            print(f"  {k:>16} = {v}")
        for k, v in IMAML_SETTINGS.get(name, {}).items():
            if k != "lam":
                print(f"  {k:>16} = {v} (imaml)")
        for k, v in REPTILE_SETTINGS.get(name, {}).items():
            print(f"  {k:>16} = {v} (reptile)")
        print(f"  {'lam':>16} = {cfg.lam_value} (imaml; baselines use 0)")
        if name in PRESET_NOTES:
            print(f"  note: {PRESET_NOTES[name]}")
    return 0


def cmd_plot(args) -> int:
    from .plot import plot_run

    print(plot_run(args.run_dir))
    return 0


_default_formatwarning = warnings.formatwarning


def _formatwarning(message, category, filename, lineno, line=None) -> str:
    """imaml's own warnings as one line, like its errors (others as Python shows them)."""
    if f"{os.sep}imaml{os.sep}" in str(filename):
        return f"imaml: warning: {message}\n"
    return _default_formatwarning(message, category, filename, lineno, line)


def main(argv=None) -> int:
    warnings.formatwarning = _formatwarning
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = {
        "train": cmd_train,
        "eval": cmd_eval,
        "presets": cmd_presets,
        "plot": cmd_plot,
    }[args.command]
    try:
        return handler(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"imaml: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imaml: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The ``imaml`` command (console script and ``python -m imaml``): exits with ``main``'s
    status. A process that torchrun started (WORLD_SIZE > 1) ends with ``os._exit`` once
    its output is flushed: its files are closed and its process group destroyed by then,
    and about once in a hundred two-process runs on 2 busy cores, PyTorch 2.13 aborted
    such a rank while the interpreter shut down ("terminate called without an active
    exception", no Python frame left; tests/test_distributed.py), which torchrun reports
    as a failed job after a finished one."""
    code = main()
    code = 0 if code is None else int(code)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
