"""The learning-speed study: which configuration learns fastest per meta-step and per second.

Trains configurations × seeds on omniglot-5w1s to fixed meta-steps (``--steps``, e.g.
250,500,1000) and at each one scores the parameters on the same ``--val-tasks``
validation tasks (held-out validation characters, one task stream for every run) twice:

- ``val_acc``: the common evaluation, 16 plain gradient steps at the preset's inner step
  size with λ = 0 (as the authors evaluate), the same for every configuration, so it
  compares the learned θ alone;
- ``val_acc_own``: the configuration's own inner loop (its λ, solver, steps).

Each run lives in ``results/learning_speed/NAME-sSEED/`` (committed: ``last.pt`` carries
it to the next session): the run folder of ``imaml train`` plus ``points.jsonl``, one
line per scored step, written after both scores are in. A killed run resumes exactly from
its last checkpoint; a step is scored once; ``report`` averages only scored steps.

    python benchmarks/learning_speed.py run --configs imaml-paper-minres,fomaml --seeds 0 \\
        --steps 250,500 --workers 2
    python benchmarks/learning_speed.py report     # docs/results/learning_speed.{json,png}
    python benchmarks/learning_speed.py time       # seconds per step, quiet and interleaved
    python benchmarks/learning_speed.py list       # the configurations and what they set
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py
ROOT = Path(__file__).resolve().parents[1]
RUNS = Path(os.environ.get("LEARNING_SPEED_RUNS", ROOT / "results" / "learning_speed"))
RESULTS = ROOT / "docs" / "results"
PRESET = "omniglot-5w1s"
VAL_SEED = 20_261_203  # one validation task stream for every configuration and seed
RECORD_KEYS = (
    "name",
    "algo",
    "is_default",
    "seed",
    "step",
    "val_acc",
    "val_acc_own",
    "val_tasks",
    "s_per_step",
    "machine",
)
COMMON_EVAL = {
    "lam": 0.0,
    "inner_steps": 16,
    "inner_lr": 0.1,
    "solver": "gd",
    "tol": 0.0,
    "inner_batch": None,
}

# iMAML's settings, pinned (they must not move when the preset's defaults move): the
# paper's inner loop (proximal term in every step), MINRES on I + H/λ, λ = 2.
_IMAML = dict(
    algo="imaml",
    lam=2.0,
    variant="paper",
    inner_solver="gd",
    inner_steps=16,
    inner_lr=0.1,
    solver="minres",
    curvature="hessian",
    cg_steps=5,
    cg_damping=0.0,
    lam_damping=0.0,
)
_DAMPED = dict(solver="cg", cg_damping=1.0, lam_damping=10.0)  # 2I + H/12, the authors'
_GGN = dict(curvature="ggn", solver="cg")  # the Gauss–Newton matrix, CG on I + G/λ
_REF = dict(_IMAML, variant="reference_code")  # plain steps, then one pull-back
_HF = dict(_IMAML, inner_solver="newton_cg", inner_steps=5, inner_lr=1.0)  # Newton-CG inner
_PRESET_REPTILE = dict(
    algo="reptile",
    train_shots=None,
    inner_solver="gd",
    inner_steps=16,
    inner_lr=0.1,
    inner_batch=None,
    outer_optim="adam",
    outer_lr=1e-3,
    outer_lr_final=None,
    meta_batch=32,
    eval_inner_steps=None,
    eval_inner_lr=None,
    eval_inner_batch=None,
)
_NICHOL = dict(
    algo="reptile",
    train_shots=10,
    inner_solver="adam",
    inner_steps=5,
    inner_lr=0.001,
    inner_batch=10,
    outer_optim="sgd",
    outer_lr=1.0,
    outer_lr_final=0.0,
    eval_inner_steps=50,
    eval_inner_lr=None,  # as trained: these runs were scored so (the presets' now take 0.03)
    eval_inner_batch=5,
)
CONFIGS: dict[str, dict] = {
    "imaml-paper-minres": dict(_IMAML),
    "imaml-paper-cg-damped": dict(_IMAML, **_DAMPED),
    "imaml-authors": dict(_REF, **_DAMPED),
    "imaml-ref-minres": dict(_REF),
    "imaml-paper-ggn": dict(_IMAML, **_GGN),
    "imaml-ref-ggn": dict(_REF, **_GGN),
    "imaml-paper-ggn-lam1": dict(_IMAML, **_GGN, lam=1.0),
    "imaml-paper-ggn-lam0.5": dict(_IMAML, **_GGN, lam=0.5),
    "imaml-paper-ggn-lam5": dict(_IMAML, **_GGN, lam=5.0),
    "imaml-paper-ggn-lam0.25": dict(_IMAML, **_GGN, lam=0.25),
    "imaml-paper-minres-lam0.5": dict(_IMAML, lam=0.5),
    # plain steps as FOMAML's, then the implicit correction with G at λ = 0.5 ≈ 1/(αK), the
    # λ at which the proximal solution and K plain steps of size α adapt alike
    "imaml-ref-ggn-lam0.5": dict(_REF, **_GGN, lam=0.5),
    "imaml-ref-minres-lam0.5": dict(_REF, lam=0.5),
    "imaml-ref-ggn-lam1": dict(_REF, **_GGN, lam=1.0),
    "imaml-paper-minres-32steps": dict(_IMAML, inner_steps=32),
    "imaml-hf": dict(_HF),
    "imaml-hf-ggn": dict(_HF, **_GGN),
    # the inner problem solved by damped Gauss–Newton (Levenberg–Marquardt) at the default's λ
    "imaml-hf-ggn-lam0.5": dict(_HF, **_GGN, lam=0.5),
    # the proximal problem solved by L-BFGS (16 iterations, Armijo from the full step)
    "imaml-lbfgs-ggn-lam0.5": dict(_IMAML, **_GGN, lam=0.5, inner_solver="lbfgs", inner_lr=1.0),
    # the proximal problem solved to a tolerance: up to 64 steps, a task stops once
    # ‖∇G(φ)‖ ≤ 0.15 (16 steps leave 0.14-0.18 over imaml-paper-ggn-lam0.5-s0's training)
    "imaml-paper-ggn-lam0.5-tol0.15": dict(_IMAML, **_GGN, lam=0.5, inner_steps=64, inner_tol=0.15),
    "fomaml": dict(algo="fomaml"),
    "maml": dict(algo="maml"),
    # Reptile on the presets' loop, pinned (16 plain steps at 0.1, Adam on θ − φ)
    "reptile": dict(_PRESET_REPTILE),
    # ... trained on 10 support examples per class (validation still 1-shot)
    "reptile-train10": dict(_PRESET_REPTILE, train_shots=10),
    # Nichol et al.'s Reptile protocol for 5-way Omniglot: 10 training shots, 5 Adam steps
    # at 0.001 on mini-batches of 10, the meta-step θ ← θ + ε(φ̄ − θ) with ε from 1 to 0
    # over their 100k steps of 5 tasks, 50 Adam steps to evaluate ...
    "reptile-nichol": dict(_NICHOL, meta_batch=5, decay_steps=100_000),
    # ... and the same 500k tasks in the 20,000 steps of Table 2: 25 tasks a step
    "reptile-nichol-mb25": dict(_NICHOL, meta_batch=25, decay_steps=20_000),
    # a diagnostic: Nichol's protocol with plain inner steps (0.1, the presets' step) in
    # place of Adam, whose steps of size lr whatever the gradient's size grow θ's norm
    "reptile-nichol-gd": dict(
        _NICHOL, meta_batch=5, decay_steps=100_000, inner_solver="gd", inner_lr=0.1
    ),
    "reptile-nichol-gd-mb25": dict(
        _NICHOL, meta_batch=25, decay_steps=20_000, inner_solver="gd", inner_lr=0.1
    ),
}


def config_for(name: str, seed: int):
    from imaml.config import from_preset

    if name not in CONFIGS:
        raise SystemExit(f"learning_speed: unknown configuration {name!r}; see 'list'")
    return from_preset(
        PRESET,
        **CONFIGS[name],
        seed=seed,
        val_tasks=0,  # scored here, on the common task stream, not by training
        compile="off",  # one code path for every configuration; no cold compilation
        threads=1,
        checkpoint_every=25,
    )


def is_default(name: str) -> bool:
    """Whether configuration ``name`` is what the omniglot-5w1s preset trains today."""
    from imaml.config import RUNTIME_FIELDS, from_preset

    ours, preset = config_for(name, 0), from_preset(PRESET)
    skip = set(RUNTIME_FIELDS) | {"seed", "val_tasks"}
    value = lambda cfg, k: cfg.lam_value if k == "lam" else getattr(cfg, k)
    return all(value(ours, k) == value(preset, k) for k in ours.to_dict() if k not in skip)


def run_dir(name: str, seed: int) -> Path:
    return RUNS / f"{name}-s{seed}"


def read_points(folder: Path) -> list[dict]:
    path = folder / "points.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill: that step is scored again
    return out


def score(folder: Path, *overrides: dict) -> list[dict]:
    """Mean validation accuracy of the run's last parameters on the common task stream,
    once per entry of ``overrides`` (an empty dict: the configuration's own inner loop);
    the checkpoint and the data are loaded once."""
    import torch

    from imaml.algorithms import make_algorithm
    from imaml.checkpoint import load_checkpoint
    from imaml.config import Config
    from imaml.data import make_task_families
    from imaml.evaluate import evaluate

    ckpt = load_checkpoint(folder / "last.pt")
    cfg = Config.from_dict(ckpt["config"])
    families, _ = make_task_families(cfg, progress=False)
    model = families["train"].make_model()
    alg = make_algorithm(
        cfg.algo, model=model, loss=families["train"].loss, **cfg.algorithm_kwargs()
    )
    out = []
    for changes in overrides:
        res = evaluate(
            alg,
            ckpt["params"],
            families["val"],
            num_tasks=ARGS.val_tasks,
            generator=torch.Generator().manual_seed(VAL_SEED),
            batch_size=cfg.meta_batch,
            overrides=changes,
        )
        out.append({**res, "step": ckpt["step"]})
    return out


def train_to(name: str, seed: int, step: int) -> dict:
    """Train run (name, seed) until meta-step ``step`` (resuming where it stopped)."""
    from imaml.train import meta_train

    folder = run_dir(name, seed)
    cfg = config_for(name, seed).replace(meta_steps=step)
    resume = (folder / "last.pt").exists()
    return meta_train(cfg, folder, resume=resume, progress=False, final_test=False)


def step_seconds(folder: Path, lo: int, hi: int) -> float:
    """Median seconds per meta-step over steps (lo, hi] of the run's log."""
    from imaml.run_folder import metric_lines

    times = []
    for line in metric_lines(folder):
        r = json.loads(line)
        if r.get("kind") == "train" and lo < r["step"] <= hi:
            times.append(r["step_time"])
    return statistics.median(times) if times else float("nan")


def run_one(name: str, seed: int, steps: list[int]) -> None:
    import torch

    from imaml.machine import machine_info

    torch.set_num_threads(1)
    folder = run_dir(name, seed)
    folder.mkdir(parents=True, exist_ok=True)
    done = {p["step"] for p in read_points(folder)}
    prev = 0
    for step in sorted(steps):
        if step in done:
            prev = step
            continue
        t0 = time.perf_counter()
        if train_to(name, seed, step)["stopped_by"]:  # a signal: checkpointed, resumes later
            return
        common, own = score(folder, COMMON_EVAL, {})
        if common["step"] != step:
            raise SystemExit(f"{folder}: last.pt is at step {common['step']}, not {step}")
        record = {
            "name": name,
            "algo": CONFIGS[name].get("algo", "imaml"),
            "is_default": is_default(name),
            "seed": seed,
            "step": step,
            "val_acc": common["mean"],
            "val_ci95": common["ci95"],
            "val_acc_own": own["mean"],
            "val_own_ci95": own["ci95"],
            "val_tasks": common["tasks"],
            "s_per_step": step_seconds(folder, prev, step),
            "machine": {**machine_info(), "threads": 1},
        }
        kept = read_points(folder) + [record]  # a line cut by a kill is dropped here
        tmp = folder / ".points.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, folder / "points.jsonl")
        print(
            f"{name} seed {seed} step {step}: common {100 * common['mean']:.1f}%, own "
            f"{100 * own['mean']:.1f}% ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        prev = step


def cmd_run(args) -> None:
    """Every (configuration, seed) to every step, ``--workers`` processes at a time, one
    thread each, in the order seed, then configuration; each run in a fresh process
    (``one``)."""
    # seed-major: every configuration's first seed before any second seed, so a study
    # stopped part-way has compared every configuration on the same seeds
    jobs = [(n, s) for s in args.seeds for n in args.configs.split(",")]
    for name, _ in jobs:
        config_for(name, 0)  # unknown names fail before anything starts
    pending, running = list(jobs), []
    RUNS.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    while pending or running:
        while pending and len(running) < args.workers:
            name, seed = pending.pop(0)
            cmd = [
                sys.executable,
                __file__,
                "one",
                name,
                str(seed),
                "--steps",
                args.steps,
                "--val-tasks",
                str(args.val_tasks),
            ]
            log = open(run_dir(name, seed).parent / f"{name}-s{seed}.log", "a")
            running.append(
                ((name, seed), subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
            )
        time.sleep(2)
        for job in [r for r in running if r[1].poll() is not None]:
            running.remove(job)
            print(f"{job[0][0]} seed {job[0][1]}: exit {job[1].returncode}", flush=True)


def summarise(records: list[dict]) -> list[dict]:
    """Mean over seeds per (configuration, step), from scored steps only."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["name"], r["step"]), []).append(r)
    rows = []
    for (name, step), rs in sorted(groups.items()):
        mean = lambda k: statistics.fmean(r[k] for r in rs)  # noqa: B023
        rows.append(
            {
                "name": name,
                "step": step,
                "seeds": sorted(r["seed"] for r in rs),
                "val_acc": mean("val_acc"),
                "val_acc_own": mean("val_acc_own"),
                "s_per_step": mean("s_per_step"),
                "is_default": rs[0]["is_default"],
            }
        )
    return rows


def cmd_time(args) -> None:
    """Seconds per meta-step of each configuration on a quiet machine: one process, one
    thread (as the runs), the configurations' steps interleaved round by round so that a
    drifting machine slows them alike (benchmarks/common.interleaved). The runs' own step
    times are taken beside other work and are only rough. Each call adds its measurement to
    ``learning_speed_times.json``; ``report`` reads the latest per configuration."""
    import torch

    from imaml.algorithms import make_algorithm
    from imaml.data import make_task_families

    from common import interleaved, machine

    torch.set_num_threads(1)
    names = args.configs.split(",")
    fns = {}
    gen = torch.Generator().manual_seed(0)
    for name in names:
        cfg = config_for(name, 0)
        families, _ = make_task_families(cfg, progress=False)
        model = families["train"].make_model(torch.Generator().manual_seed(0))
        alg = make_algorithm(
            cfg.algo, model=model, loss=families["train"].loss, **cfg.algorithm_kwargs()
        )
        params = {k: v.detach() for k, v in model.named_parameters()}
        batch = families["train"].sample(cfg.meta_batch, generator=gen)
        fns[name] = lambda alg=alg, params=params, batch=batch: alg.meta_grad(params, batch)
        fns[name]()  # warm-up
    times = interleaved(fns, repeats=args.repeats)
    measurement = {
        "command": "python benchmarks/learning_speed.py time --configs " + args.configs,
        "s_per_step": {n: t["median_s"] for n, t in times.items()},
        "spread": {n: {k: v for k, v in t.items() if k != "times_s"} for n, t in times.items()},
        "threads": 1,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": machine(),
    }
    # one file for every timing session: each measurement kept, the latest per configuration read
    path = RESULTS / "learning_speed_times.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    measurements = old.get("measurements", []) + [measurement]
    latest = {n: t for m in measurements for n, t in m["s_per_step"].items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"s_per_step": latest, "measurements": measurements}, indent=1))
    for n, t in times.items():
        print(
            f"{n:<28} {t['median_s']:.2f} s per meta-step (range {t['min_s']:.2f}-{t['max_s']:.2f})"
        )


def quiet_times() -> dict:
    path = RESULTS / "learning_speed_times.json"
    return json.loads(path.read_text())["s_per_step"] if path.exists() else {}


def cmd_report(args) -> None:
    records = []
    for folder in sorted(RUNS.glob("*-s*")):
        if folder.is_dir():
            records += read_points(folder)
    for r in records:  # today's default, whatever it was when the point was scored
        r["is_default"] = r["name"] in CONFIGS and is_default(r["name"])
    # the results-file contract's keys (the confidence intervals stay in points.jsonl)
    records = [{k: r[k] for k in RECORD_KEYS} for r in records]
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = summarise(records)
    quiet = quiet_times()
    for r in rows:  # seconds per step measured quietly (``time``), where measured
        r["s_per_step_quiet"] = quiet.get(r["name"])
    payload = {
        "command": "python benchmarks/learning_speed.py report",
        "preset": PRESET,
        "common_eval": COMMON_EVAL,
        "val_seed": VAL_SEED,
        "configs": {n: CONFIGS[n] for n in sorted({r["name"] for r in records})},
        "records": records,
        "summary": rows,
    }
    (RESULTS / "learning_speed.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / "learning_speed.md").write_text(markdown(rows))
    plot(rows, RESULTS / "learning_speed.png")
    print(f"{'configuration':<28} {'step':>5} {'seeds':>6} {'common':>7} {'own':>7} {'s/step':>7}")
    for r in rows:
        print(
            f"{r['name']:<28} {r['step']:>5} {len(r['seeds']):>6} {100 * r['val_acc']:>6.1f}% "
            f"{100 * r['val_acc_own']:>6.1f}% {r['s_per_step']:>7.2f}"
        )


def markdown(rows: list[dict]) -> str:
    """The study's table: validation accuracy by configuration and meta-step."""
    steps = sorted({r["step"] for r in rows})
    names = sorted(
        {r["name"] for r in rows},
        key=lambda n: (n.split("-")[0] in ("fomaml", "maml", "reptile"), n),
    )
    cell = {(r["name"], r["step"]): r for r in rows}
    head = " | ".join(f"{s} common / own" for s in steps)
    lines = [
        "Generated by `python benchmarks/learning_speed.py report`: validation accuracy (%) on",
        "the same 600 tasks of held-out characters, common evaluation (16 plain steps, λ = 0) /",
        "the configuration's own inner loop, mean over the seeds scored (their number in",
        "brackets); s/step measured quietly (`learning_speed.py time`) where measured, the",
        "latest measurement of each (`learning_speed_times.json` keeps every one, with its date",
        "and machine): compare configurations timed together.",
        "",
        f"| configuration | {head} | s/step |",
        "|---|" + "---|" * (len(steps) + 1),
    ]
    for n in names:
        parts = []
        for s in steps:
            r = cell.get((n, s))
            parts.append(
                "–"
                if r is None
                else f"{100 * r['val_acc']:.1f} / {100 * r['val_acc_own']:.1f} ({len(r['seeds'])})"
            )
        quiet = next((r["s_per_step_quiet"] for r in rows if r["name"] == n), None)
        default = " (default)" if any(r["is_default"] for r in rows if r["name"] == n) else ""
        seconds = "–" if quiet is None else f"{quiet:.2f}"
        lines.append(f"| `{n}`{default} | " + " | ".join(parts) + f" | {seconds} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    tab20 = plt.get_cmap("tab20").colors
    strong = {"default": "tab:red", "fomaml": "tab:blue", "maml": "tab:green", "reptile": "black"}
    # the other configurations: thin dashed lines in the hues the strong four leave free
    others = itertools.cycle(
        tab20[k] for k in (2, 8, 10, 12, 16, 18, 3, 9, 11, 13, 17, 19, 1, 5, 7, 15)
    )
    for name in sorted({r["name"] for r in rows}):
        rs = [r for r in rows if r["name"] == name]
        steps = [r["step"] for r in rs]
        per = [r["s_per_step_quiet"] or r["s_per_step"] for r in rs]
        secs = [r["step"] * p / 60 for r, p in zip(rs, per, strict=True)]
        acc = [100 * r["val_acc"] for r in rs]
        default = rs[0]["is_default"]
        color = strong.get("default" if default else name)
        main = color is not None
        style = dict(
            linestyle="-" if main else "--",
            linewidth=2.5 if main else 1.0,
            markersize=6 if main else 3,
            marker="o",
            color=color or next(others),
            label=name + (" (default)" if default else ""),
        )
        # a point scored on fewer seeds than the configuration's others: a hollow marker
        most = max(len(r["seeds"]) for r in rs)
        hollow = [len(r["seeds"]) < most for r in rs]
        for ax, xs in ((axes[0], steps), (axes[1], secs)):
            (line,) = ax.plot(xs, acc, **style)
            few = [(x, a) for x, a, h in zip(xs, acc, hollow, strict=True) if h]
            if few:
                ax.plot(*zip(*few, strict=True), "o", mfc="white", mec=line.get_color(), ms=7)
    axes[0].set_xlabel("meta-steps")
    axes[1].set_xlabel("minutes of training, 1 thread (quiet step times where measured)")
    for ax in axes:
        ax.set_ylabel("validation accuracy, common evaluation (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(
        f"{PRESET}: learning speed (mean over seeds; hollow: fewer seeds than the line's other points)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and score configurations × seeds")
    r.add_argument("--configs", required=True, help="comma-separated names (see 'list')")
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--workers", type=int, default=2, help="processes at a time, 1 thread each")
    o = sub.add_parser("one", help="one run (what 'run' starts)")
    o.add_argument("name")
    o.add_argument("seed", type=int)
    for q in (r, o):
        q.add_argument("--steps", default="250,500,1000", help="comma-separated meta-steps")
        q.add_argument("--val-tasks", type=int, default=600)
    sub.add_parser("report", help="write docs/results/learning_speed.{json,png}")
    t = sub.add_parser("time", help="seconds per step of each configuration, interleaved")
    t.add_argument("--configs", default=",".join(CONFIGS))
    t.add_argument("--repeats", type=int, default=5)
    sub.add_parser("list", help="the configurations")
    ARGS = p.parse_args(argv)
    if ARGS.cmd == "run":
        cmd_run(ARGS)
    elif ARGS.cmd == "one":
        run_one(ARGS.name, ARGS.seed, [int(s) for s in ARGS.steps.split(",")])
    elif ARGS.cmd == "report":
        cmd_report(ARGS)
    elif ARGS.cmd == "time":
        cmd_time(ARGS)
    else:
        for name, values in CONFIGS.items():
            print(f"{name}: {values}")


ARGS = None

if __name__ == "__main__":
    main()
