import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from imaml.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from imaml.cli import main
from imaml.config import IMAML_SETTINGS, PRESETS, Config, ConfigError, from_preset
from imaml.train import evaluate_run, meta_train

from conftest import needs_real

ROOT = Path(__file__).resolve().parents[1]


def sinusoid(**kw):
    base = dict(
        meta_steps=6,
        meta_batch=4,
        val_every=3,
        val_tasks=8,
        test_tasks=10,
        checkpoint_every=100,
        threads=1,
    )
    return from_preset("sinusoid", **{**base, **kw})


def params_of(path):
    return load_checkpoint(path)["params"]


@pytest.mark.parametrize("algo", ["imaml", "maml", "fomaml", "reptile"])
def test_training_writes_the_run_folder(tmp_path, algo):
    s = meta_train(sinusoid(algo=algo), tmp_path / "run", progress=False)
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {
        "config.json",
        "metrics.jsonl",
        "last.pt",
        "best.pt",
        "learning_curve.png",
        "eval.json",
        "machine.json",
    } <= names
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in lines if r["kind"] == "val"] == [3, 6]
    assert s["test"]["metric"] == "mse" and s["test"]["tasks"] == 10
    assert json.loads((tmp_path / "run" / "config.json").read_text())["algo"] == algo
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["step"] == 6 and Config.from_dict(ck["config"]).algo == algo


@pytest.mark.parametrize("algo", ["imaml", "maml"])
def test_resume_gives_exactly_the_uninterrupted_parameters(tmp_path, algo):
    cfg = sinusoid(algo=algo, meta_steps=7)
    meta_train(cfg, tmp_path / "a", progress=False, final_test=False)
    s = meta_train(cfg, tmp_path / "b", progress=False, max_steps_this_run=3, final_test=False)
    assert s["stopped_by"] == "step limit" and s["step"] == 3
    s = meta_train(cfg, tmp_path / "b", resume=True, progress=False, max_steps_this_run=2)
    assert s["step"] == 5
    meta_train(None, tmp_path / "b", resume=True, progress=False, final_test=False)
    a, b = params_of(tmp_path / "a" / "last.pt"), params_of(tmp_path / "b" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [
        {k: v for k, v in json.loads(x).items() if k != "step_time"} for x in lines
    ]
    assert strip(la) == strip(lb)
    runs = json.loads((tmp_path / "b" / "machine.json").read_text())["runs"]
    assert [r["from_step"] for r in runs] == [0, 3, 5]
    assert all(r["cpu_model"] and r["cpu_capability"] and r["processes"] == 1 for r in runs)


def test_a_log_folded_into_gzip_resumes_trims_and_reads_as_the_plain_one(tmp_path):
    from imaml.plot import read_metrics
    from imaml.run_folder import compress_metrics

    cfg = sinusoid(meta_steps=7)
    meta_train(cfg, tmp_path / "a", progress=False, final_test=False)
    b = tmp_path / "b"
    meta_train(cfg, b, progress=False, max_steps_this_run=3, final_test=False)
    with open(b / "metrics.jsonl", "a") as f:  # logged after the checkpoint, then a crash
        f.write(json.dumps({"kind": "train", "step": 4, "step_time": 1.0}) + '\n{"kind": "tr')
    assert compress_metrics(b) and not (b / "metrics.jsonl").exists()
    meta_train(cfg, b, resume=True, progress=False, max_steps_this_run=2, final_test=False)
    first = (b / "metrics.jsonl.gz").read_bytes()
    assert compress_metrics(b) and not compress_metrics(b)  # nothing left to fold
    assert (b / "metrics.jsonl.gz").read_bytes().startswith(first)  # appended, not rewritten
    meta_train(None, b, resume=True, progress=False, final_test=False)  # gz + plain
    pa, pb = params_of(tmp_path / "a" / "last.pt"), params_of(b / "last.pt")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "step_time"} for r in rs]
    (ta, va), (tb, vb) = read_metrics(tmp_path / "a"), read_metrics(b)
    assert [r["step"] for r in tb] == list(range(1, 8)) and strip(tb) == strip(ta) and vb == va


def test_a_log_is_not_folded_under_a_live_run_and_a_broken_gzip_fails_loudly(tmp_path):
    from imaml.plot import read_metrics
    from imaml.run_folder import compress_metrics, trim_metrics

    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    (tmp_path / ".lock").write_text(str(os.getppid()))  # a live process holds the folder
    assert not compress_metrics(tmp_path) and (tmp_path / "metrics.jsonl").exists()
    (tmp_path / ".lock").unlink()
    assert compress_metrics(tmp_path)
    gz = tmp_path / "metrics.jsonl.gz"
    gz.write_bytes(gz.read_bytes()[:-6])  # truncated
    for read in (read_metrics, lambda d: trim_metrics(d, 1)):
        with pytest.raises(ValueError, match="metrics.jsonl.gz is not a complete gzip file"):
            read(tmp_path)


def test_resume_can_extend_the_schedule(tmp_path):
    meta_train(sinusoid(meta_steps=3), tmp_path / "r", progress=False, final_test=False)
    s = meta_train(
        sinusoid(meta_steps=5), tmp_path / "r", resume=True, progress=False, final_test=False
    )
    assert s["step"] == 5


def test_machine_record_keeps_one_entry_per_start_and_survives_a_broken_file(tmp_path):
    from imaml.run_folder import record_machine as _record_machine

    (tmp_path / "machine.json").write_text("{not json")
    for step in (0, 40, 80, 40):  # the last: resumed from an earlier checkpoint
        _record_machine(tmp_path, {"from_step": step, "cpu_model": f"cpu{step}"})
    runs = json.loads((tmp_path / "machine.json").read_text())["runs"]
    assert [r["from_step"] for r in runs] == [0, 40]
    assert runs[-1]["cpu_model"] == "cpu40"
    assert not list(tmp_path.glob(".*.tmp"))


def test_second_run_into_same_folder_refuses(tmp_path):
    meta_train(sinusoid(meta_steps=1), tmp_path / "r", progress=False, final_test=False)
    with pytest.raises(ValueError, match="--resume"):
        meta_train(sinusoid(meta_steps=1), tmp_path / "r", progress=False)


def test_evaluate_run_reports_mean_and_ci(tmp_path):
    meta_train(sinusoid(), tmp_path / "r", progress=False, final_test=False)
    r = evaluate_run(tmp_path / "r", tasks=12)
    assert r["tasks"] == 12 and r["ci95"] > 0 and r["mean"] > 0
    assert json.loads((tmp_path / "r" / "eval.json").read_text())["mean"] == r["mean"]
    assert r["machine"]["cpu_model"] and r["machine"]["threads"] >= 1
    r0 = evaluate_run(tmp_path / "r", tasks=12, eval_inner_steps=0)
    assert r0["eval_inner"]["inner_steps"] == 0 and r0["mean"] != r["mean"]
    assert json.loads((tmp_path / "r" / "eval.json").read_text())["mean"] == r0["mean"]
    r1 = evaluate_run(tmp_path / "r", tasks=12, write=False)  # keeps the run's eval.json
    assert r1["mean"] == r["mean"]
    assert json.loads((tmp_path / "r" / "eval.json").read_text())["mean"] == r0["mean"]


# -- checkpoints -------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    state = {
        "format": "imaml-checkpoint-v1",
        "params": {"w": torch.randn(3)},
        "config": {"a": 1},
        "step": 4,
        "rng": {"tasks": torch.Generator().manual_seed(1).get_state()},
    }
    save_checkpoint(tmp_path / "c.pt", state)
    back = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(back["params"]["w"], state["params"]["w"]) and back["step"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left


def test_non_finite_parameters_are_never_saved(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"params": {"w": torch.ones(2)}})
    with pytest.raises(CheckpointError, match="not finite"):
        save_checkpoint(tmp_path / "c.pt", {"params": {"w": torch.tensor([1.0, float("nan")])}})
    assert torch.equal(
        torch.load(tmp_path / "c.pt", weights_only=True)["params"]["w"], torch.ones(2)
    )
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/imaml-pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"format": "imaml-checkpoint-v1", "x": Evil()}, f)
    Path("/tmp/imaml-pwned").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(p)
    assert not Path("/tmp/imaml-pwned").exists()


def test_truncated_and_foreign_checkpoints_name_the_file(tmp_path):
    meta_train(sinusoid(meta_steps=1), tmp_path / "r", progress=False, final_test=False)
    data = (tmp_path / "r" / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="foreign.pt is not an imaml checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


# -- config --------------------------------------------------------------------------


def test_every_preset_is_valid_for_every_algorithm():
    for name in PRESETS:
        for algo in ("imaml", "maml", "fomaml", "reptile"):
            cfg = from_preset(name, algo=algo)
            imaml_lam = IMAML_SETTINGS.get(name, {}).get("lam", 2.0)
            assert cfg.lam_value == (imaml_lam if algo == "imaml" else 0.0)


def test_reptile_takes_nichols_protocol_on_the_omniglot_presets():
    """Nichol et al.'s Reptile (10 training shots, mini-batches, meta-step 1 → 0 over the
    schedule; their 5 tasks × 100k steps, 20-way 200k, as 25 (50) × 20,000) with plain
    inner steps; given values win, the other algorithms keep the presets' loop."""
    five, twenty = (from_preset(f"omniglot-{s}", algo="reptile") for s in ("5w1s", "20w5s"))
    assert (five.train_k, five.inner_solver, five.inner_steps, five.inner_batch) == (
        10,
        "gd",
        5,
        10,
    )
    assert (five.outer_optim, five.outer_lr, five.outer_lr_final, five.decay_steps) == (
        "sgd",
        1.0,
        0.0,
        20000,
    )
    assert (five.meta_batch, five.eval_inner_steps, five.eval_inner_batch) == (25, 50, 5)
    assert five.eval_inner_lr == 0.03 and five.inner_lr == 0.1
    assert (twenty.inner_steps, twenty.inner_batch, twenty.meta_batch) == (10, 20, 50)
    assert twenty.eval_inner_batch == 10 and twenty.k_shot == 5 and twenty.eval_inner_lr == 0.01
    assert from_preset("omniglot-5w1s", algo="reptile", inner_steps=16).inner_steps == 16
    for algo in ("imaml", "maml", "fomaml"):
        cfg = from_preset("omniglot-5w1s", algo=algo)
        assert (cfg.inner_batch, cfg.train_shots, cfg.outer_optim, cfg.meta_batch) == (
            None,
            None,
            "adam",
            32,
        )
    assert from_preset("omniglot-5w1s-hf", algo="reptile").inner_solver == "newton_cg"


def test_imaml_settings_apply_to_imaml_alone_and_yield_to_given_values():
    cfg = from_preset("omniglot-5w1s")
    assert (cfg.variant, cfg.curvature, cfg.solver, cfg.lam_value) == (
        "reference_code",
        "ggn",
        "cg",
        0.5,
    )
    for algo in ("maml", "fomaml", "reptile"):  # the baselines keep no proximal term
        base = from_preset("omniglot-5w1s", algo=algo)
        assert (base.variant, base.curvature, base.solver, base.lam_value) == (
            "paper",
            "hessian",
            "minres",
            0.0,
        )
    paper = from_preset("omniglot-5w1s", variant="paper", lam=2.0, solver="minres")
    assert (paper.variant, paper.lam_value, paper.solver, paper.curvature) == (
        "paper",
        2.0,
        "minres",
        "ggn",
    )
    hf = from_preset("omniglot-5w1s-hf")  # Newton-CG solves the proximal problem (paper loop)
    assert (hf.variant, hf.inner_solver, hf.curvature, hf.solver, hf.lam_value) == (
        "paper",
        "newton_cg",
        "ggn",
        "cg",
        0.5,
    )
    assert from_preset("omniglot-5w1s-hf", algo="fomaml").curvature == "hessian"


def test_paper_settings_in_omniglot_presets():
    c = from_preset("omniglot-20w5s", variant="paper", lam=2.0)  # the paper's loop and λ
    assert (
        c.n_way,
        c.k_shot,
        c.queries,
        c.inner_steps,
        c.inner_lr,
        c.lam_value,
        c.cg_steps,
        c.meta_batch,
        c.outer_lr,
        c.meta_steps,
    ) == (20, 5, 5, 25, 0.1, 2.0, 5, 32, 1e-3, 20000)
    assert from_preset("omniglot-5w1s").inner_steps == 16


@pytest.mark.parametrize(
    "bad",
    [
        dict(lam=0.0),
        dict(lam=-1.0),
        dict(inner_steps=-1),
        dict(meta_batch=0),
        dict(k_shot=15, k_query=6),
        dict(solver="lu"),
        dict(algo="sgd"),
        dict(task="imagenet"),
        dict(outer_lr=float("nan")),
        dict(device="tpu"),
    ],
)
def test_invalid_config_values_raise(bad):
    with pytest.raises(ConfigError):
        from_preset("omniglot-5w1s", **bad)


def test_unknown_keys_and_presets_raise():
    with pytest.raises(ConfigError, match="unknown config keys"):
        Config.from_dict({"lamda": 2.0})
    with pytest.raises(ConfigError, match="unknown preset"):
        from_preset("omniglot-1w1s")


# -- CLI -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,match",
    [
        (["train", "--lam", "0"], "lam must be"),
        (["train", "--inner-steps", "-2"], "inner_steps must be"),
        (["train", "--preset", "nope"], "unknown preset"),
        (["train", "--k-shot", "15", "--k-query", "10"], "exceeds the 20"),
        (["eval", "/nonexistent/run"], "no checkpoint at /nonexistent/run"),
        (["train", "--task", "sinusoid", "--time-budget", "0"], "time-budget"),
        (["train", "--cpu-malloc", "jemalloc"], "unknown cpu_malloc 'jemalloc'"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, match, capsys, tmp_path):
    argv = [a.replace("/nonexistent", str(tmp_path / "none")) for a in argv]
    match = match.replace("/nonexistent", str(tmp_path / "none"))
    assert main(argv + (["--out", str(tmp_path / "o")] if argv[0] == "train" else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imaml: error:") and match in err[0]


def test_cli_train_then_eval_json(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert (
        main(
            [
                "train",
                "--task",
                "sinusoid",
                "--meta-steps",
                "4",
                "--meta-batch",
                "4",
                "--val-every",
                "2",
                "--val-tasks",
                "4",
                "--test-tasks",
                "8",
                "--out",
                out,
                "--quiet",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    assert "test mse" in capsys.readouterr().out
    assert main(["eval", out, "--tasks", "6", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"metric", "mean", "ci95", "tasks", "config"} <= set(r) and r["tasks"] == 6
    assert r["config"]["task"] == "sinusoid"
    assert main(["plot", out]) == 0


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--lam",
        "--cg-steps",
        "--solver",
        "--inner-lr",
        "--meta-batch",
        "--resume",
        "--time-budget",
        "--no-batched",
    ):
        assert flag in text
    assert main(["presets"]) == 0
    assert "omniglot-20w5s" in capsys.readouterr().out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_says_how_to_resume(tmp_path, sig):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imaml",
            "train",
            "--task",
            "sinusoid",
            "--meta-steps",
            "100000",
            "--compile",
            "off",  # a long schedule; the test is about signals, not compiling
            "--meta-batch",
            "4",
            "--out",
            str(out),
            "--quiet",
            "--threads",
            "1",
            "--val-tasks",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    deadline = time.time() + 60
    while (
        not (out / "metrics.jsonl").exists()
        or not (out / "metrics.jsonl").read_text().count("\n") > 3
    ):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert f"stopped by {sig.name}" in stdout and "--resume" in stdout
    assert load_checkpoint(out / "last.pt")["step"] >= 4


@needs_real
@pytest.mark.parametrize("algo", ["imaml", "maml", "fomaml", "reptile"])
def test_few_steps_on_real_omniglot_and_exact_resume(tmp_path, algo):
    cfg = from_preset(
        "omniglot-5w1s",
        algo=algo,
        meta_steps=4,
        meta_batch=2,
        inner_steps=3,
        val_every=2,
        val_tasks=4,
        test_tasks=6,
        threads=2,
    )
    s = meta_train(cfg, tmp_path / "a", progress=False)
    assert 0 <= s["test"]["mean"] <= 1 and s["test"]["metric"] == "accuracy"
    ck = load_checkpoint(tmp_path / "a" / "last.pt")
    assert len(ck["split"]["train_classes"]) == 1100 and len(ck["split"]["test_classes"]) == 423
    assert not set(ck["split"]["train_classes"]) & set(ck["split"]["test_classes"])
    meta_train(cfg, tmp_path / "b", progress=False, max_steps_this_run=2, final_test=False)
    meta_train(None, tmp_path / "b", resume=True, progress=False, final_test=False)
    a, b = params_of(tmp_path / "a" / "last.pt"), params_of(tmp_path / "b" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_miniimagenet_trains_through_the_same_path(tmp_path):
    from test_miniimagenet import write_csv_copy

    root = write_csv_copy(tmp_path / "data", classes=5, per_class=4)
    cfg = from_preset(
        "miniimagenet-5w1s",
        data_dir=str(root),
        meta_steps=2,
        meta_batch=2,
        k_query=2,
        inner_steps=1,
        val_every=2,
        val_tasks=2,
        test_tasks=2,
        threads=1,
    )
    s = meta_train(cfg, tmp_path / "run", progress=False)
    assert s["step"] == 2 and 0 <= s["test"]["mean"] <= 1


def test_configs_saved_with_the_conv_field_still_load(tmp_path):
    # the convolution variants left the library; configs written before keep loading
    from imaml.config import Config, ConfigError

    saved = {**from_preset("sinusoid").to_dict(), "conv": "native"}
    assert Config.from_dict(saved) == from_preset("sinusoid")
    with pytest.raises(ConfigError, match="conv 'slices'.*use native"):
        Config.from_dict({**saved, "conv": "slices"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    code = main(
        [
            "train",
            "--config",
            str(path),
            "--meta-steps",
            "1",
            "--val-tasks",
            "0",
            "--no-test",
            "--quiet",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert code == 0


def test_a_live_run_holds_the_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(str(sleeper.pid))
        with pytest.raises(
            ValueError, match=f"in use by another imaml run \\(pid {sleeper.pid}\\)"
        ):
            meta_train(sinusoid(meta_steps=1), out, progress=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    # the owner is gone: its stale lock is taken over, and released at the end
    meta_train(sinusoid(meta_steps=1), out, progress=False, final_test=False)
    assert not (out / ".lock").exists()


def test_exploding_inner_loop_stops_cleanly_without_nan_parameters(tmp_path):
    cfg = sinusoid(meta_steps=3, inner_lr=1e6, inner_steps=30)
    with pytest.raises(ValueError, match="non-finite"):
        meta_train(cfg, tmp_path / "r", progress=False)
    for f in (tmp_path / "r").glob("*.pt"):
        assert all(torch.isfinite(v).all() for v in load_checkpoint(f)["params"].values())


def test_cli_reports_a_held_folder_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(str(os.getppid()))
    assert (
        main(["train", "--task", "sinusoid", "--meta-steps", "1", "--out", str(out), "--quiet"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by another imaml run" in err[0]


def test_benchmarks_index_lists_every_script():
    index = (ROOT / "benchmarks" / "README.md").read_text()
    scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py")} | {"gpu_check.sh"}
    missing = sorted(s for s in scripts if f"`{s}`" not in index)
    assert not missing, f"benchmarks/README.md does not list {missing}"


def test_solver_steps_is_the_linear_solvers_steps_and_cg_steps_its_alias():
    from imaml.cli import build_parser

    p = build_parser()
    assert p.parse_args(["train", "--solver-steps", "7"]).cg_steps == 7
    assert p.parse_args(["train", "--cg-steps", "3"]).cg_steps == 3
