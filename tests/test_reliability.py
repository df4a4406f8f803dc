"""Faults and bad input: nothing lost, nothing trusted blindly (kills, full disks, fuzzing)."""

import errno
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imaml import implicit_meta_grad, make_algorithm
from imaml.checkpoint import CheckpointError, load_checkpoint
from imaml.cli import main, read_config_file
from imaml.config import Config, ConfigError, from_preset
from imaml.data.omniglot import DataError, load_omniglot
from imaml.train import meta_train

from conftest import needs_real, rel
from omniglot_fixture import SMALL, make_release, release_files

ROOT = Path(__file__).resolve().parents[1]


def sinusoid(**kw):
    base = dict(
        meta_steps=6, meta_batch=4, val_every=1000, val_tasks=0, checkpoint_every=1, threads=1
    )
    return from_preset("sinusoid", **{**base, **kw})


# -- SIGKILL at random moments -------------------------------------------------------


def test_ten_kills_at_random_moments_lose_nothing(tmp_path):
    steps = 300
    cfg = sinusoid(meta_steps=steps)
    meta_train(cfg, tmp_path / "ref", progress=False, final_test=False)
    out = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "imaml",
        "train",
        "--task",
        "sinusoid",
        "--meta-steps",
        str(steps),
        "--meta-batch",
        "4",
        "--val-tasks",
        "0",
        "--val-every",
        "1000",
        "--checkpoint-every",
        "1",
        "--threads",
        "1",
        "--quiet",
        "--no-test",
        "--out",
        str(out),
    ]
    rng = random.Random(0)
    resumed_at = []
    for _ in range(10):
        resume = (out / "last.pt").exists()
        if resume:
            resumed_at.append(load_checkpoint(out / "last.pt")["step"])
        proc = subprocess.Popen(
            argv + (["--resume"] if resume else []),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        # wait until the run is training (its log grows), then kill it at a random moment
        deadline = time.time() + 60
        start = (out / "metrics.jsonl").stat().st_size if (out / "metrics.jsonl").exists() else 0
        while proc.poll() is None and time.time() < deadline:
            if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > start:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        proc.wait()
        for f in out.glob("*.pt"):  # every checkpoint on disk is complete and readable
            assert all(torch.isfinite(v).all() for v in load_checkpoint(f)["params"].values())
    assert len(set(resumed_at)) >= 5, resumed_at  # kills landed at many different steps
    done = subprocess.run(argv + ["--resume"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = load_checkpoint(tmp_path / "ref" / "last.pt"), load_checkpoint(out / "last.pt")
    assert b["step"] == steps
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    assert not list(out.glob(".*.tmp"))  # killed writes left no temporary files behind
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, steps + 1))  # the log has each step once


# -- disk, folders -------------------------------------------------------------------


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import imaml.checkpoint as ck

    real_save, calls = torch.save, {"n": 0}

    def save(obj, f):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(ck.torch, "save", save)
    with pytest.raises(
        CheckpointError, match="No space left on device .the previous checkpoint is intact"
    ):
        meta_train(sinusoid(), tmp_path / "r", progress=False)
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert load_checkpoint(tmp_path / "r" / "last.pt")["step"] == 2
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "config.json",
        "last.pt",
        "machine.json",
        "metrics.jsonl",
    ]


def test_unwritable_output_folder_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    os.chmod(out, 0o555)
    try:
        assert main(["train", "--task", "sinusoid", "--out", str(out), "--quiet"]) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        os.chmod(out, 0o755)


def test_output_path_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        meta_train(sinusoid(), tmp_path / "f", progress=False)


# -- adversarial numerics ------------------------------------------------------------


def test_huge_inputs_never_make_parameters_nan(tmp_path):
    fam_batch = None
    from imaml.data.sinusoid import SinusoidTasks

    fam = SinusoidTasks(k_shot=5, k_query=5)
    model = fam.make_model(torch.Generator().manual_seed(0))
    theta = {k: v.detach() for k, v in model.named_parameters()}
    fam_batch = fam.sample(4, generator=torch.Generator().manual_seed(0))
    x = fam_batch.support_x.clone()
    x[2] *= 1e30
    for algo in ("imaml", "maml", "fomaml", "reptile"):
        alg = make_algorithm(algo, model=model, loss="mse", inner_steps=5, inner_lr=0.01)
        g, stats = alg.meta_grad(theta, type(fam_batch)(x, *fam_batch[1:]))
        assert bool(stats["skipped"][2]) and not bool(stats["skipped"][[0, 1, 3]].any())
        assert all(torch.isfinite(v).all() for v in g.values())


def quadratic(eigs):
    n = len(eigs)
    Q, _ = torch.linalg.qr(
        torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )
    H = Q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ Q.T
    support = lambda p: 0.5 * p["w"] @ H @ p["w"]
    query = lambda p: ((p["w"] - 1) ** 2).sum()
    phi = {"w": torch.ones(n, dtype=torch.float64) * 0.5}
    return support, query, phi, H


def test_zero_curvature_gives_the_query_gradient_for_every_solver():
    support, query, phi, _ = quadratic([0.0] * 6)
    v = torch.func.grad(query)(phi)
    for solver in ("cg", "minres", "neumann", "exact"):
        g = implicit_meta_grad(support, query, phi, phi, lam=2.0, solver=solver, steps=3)
        assert rel(g, v) < 1e-12, solver


def test_negative_curvature_is_flagged_and_stays_finite():
    from imaml.implicit import solve_implicit

    support, query, phi, H = quadratic([-3.0, -1.0, 0.5, 2.0, 4.0, 8.0])  # I + H/2 is indefinite
    v = torch.func.grad(query)(phi)
    exact = torch.linalg.solve(torch.eye(6, dtype=torch.float64) + H / 2, v["w"])
    for solver in ("cg", "minres"):
        g, info, _ = solve_implicit(support, v, phi, lam=2.0, solver=solver, steps=12)
        assert bool(info["negative_curvature"]) and torch.isfinite(g["w"]).all(), solver
    g, _, _ = solve_implicit(support, v, phi, lam=2.0, solver="minres", steps=12)
    assert rel(g["w"], exact) < 1e-8  # MINRES solves it anyway


def test_tiny_lambda_stays_finite_in_training(tmp_path):
    s = meta_train(
        sinusoid(lam=1e-8, meta_steps=5), tmp_path / "r", progress=False, final_test=False
    )
    assert s["step"] == 5
    assert all(
        torch.isfinite(v).all()
        for v in load_checkpoint(tmp_path / "r" / "last.pt")["params"].values()
    )


# -- fuzzing -------------------------------------------------------------------------

VALID = release_files()


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_release_loads_or_raises_data_error(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("fuzz")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(
        tmp / "xdg"
    )  # hypothesis forbids function-scoped fixtures here
    try:
        _fuzz_release(tmp, data)
    finally:
        if old is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = old


def _fuzz_release(tmp, data):
    files = dict(VALID)
    kind = data.draw(st.sampled_from(["member", "truncate", "flip", "drop", "rename"]))
    names = sorted(files)
    if kind == "member":
        files[data.draw(st.sampled_from(names))] = data.draw(st.binary(max_size=300))
    elif kind == "drop":
        files.pop(data.draw(st.sampled_from(names)))
    elif kind == "rename":
        old = data.draw(st.sampled_from(names))
        files[
            old.replace(
                "character", data.draw(st.sampled_from(["char", "character9", "x/character"]))
            )
        ] = files.pop(old)
    root = make_release(tmp, files=files)
    z = root / "omniglot" / "images_background.zip"
    raw = z.read_bytes()
    if kind == "truncate":
        z.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    elif kind == "flip":
        pos = data.draw(st.integers(0, len(raw) - 1))
        z.write_bytes(raw[:pos] + bytes([raw[pos] ^ 0xFF]) + raw[pos + 1 :])
    try:
        out = load_omniglot(root, expected=SMALL, progress=False, download_missing=False)
    except DataError:
        return
    assert out.images.shape == (9, 20, 28, 28)


config_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 50),
    st.floats(allow_nan=True, allow_subnormal=False),
    st.text(max_size=8),
    st.sampled_from(["imaml", "cg", "cpu", "paper", "gd"]),
    st.lists(st.integers(), max_size=2),
)
config_keys = st.sampled_from(
    [f.name for f in __import__("dataclasses").fields(Config)] + ["lamda", "steps"]
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(config_keys, config_values, max_size=6))
def test_fuzzed_config_is_valid_or_a_config_error(d):
    try:
        cfg = from_preset("omniglot-5w1s", **d)
    except ConfigError:
        return
    assert isinstance(cfg, Config)
    assert Config.from_dict(cfg.to_dict()) == cfg


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=200) | st.text(max_size=80).map(str.encode))
def test_fuzzed_config_file_is_read_or_refused(tmp_path_factory, blob):
    p = tmp_path_factory.mktemp("cfg") / "c.json"
    p.write_bytes(blob)
    try:
        d = read_config_file(str(p))
    except ConfigError:
        return
    assert isinstance(d, dict)


def test_config_file_with_unknown_key_exits_2(tmp_path, capsys):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"lam": 2.0, "lamda": 1.0}))
    assert main(["train", "--config", str(p), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown keys ['lamda']" in err[0]


def test_config_file_values_apply_and_flags_win(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(
        json.dumps({"task": "sinusoid", "meta_steps": 2, "meta_batch": 3, "inner_steps": 2})
    )
    assert (
        main(
            [
                "train",
                "--config",
                str(p),
                "--meta-batch",
                "2",
                "--out",
                str(tmp_path / "o"),
                "--quiet",
                "--no-test",
                "--val-tasks",
                "0",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert (cfg["meta_steps"], cfg["meta_batch"], cfg["inner_steps"]) == (2, 2, 2)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--k-shot", "10", "--k-query", "11"], "exceeds the 20"),
        (["--train-shots", "20"], "train_shots + k_query = 21 exceeds the 20"),
        (["--train-shots", "0"], "train_shots must be"),
        (["--inner-batch", "0"], "inner_batch must be"),
        (["--inner-batch", "10", "--inner-solver", "lbfgs"], "needs a first-order inner solver"),
        (["--eval-inner-batch", "5", "--inner-tol", "0.1"], "do not combine"),
        (["--outer-optim", "rmsprop"], "outer_optim"),
        (["--outer-lr-final", "-1"], "outer_lr_final must be"),
        (["--decay-steps", "-5"], "decay_steps must be"),
        (["--lam", "-1"], "lam must be"),
        (["--meta-steps", "-3"], "meta_steps must be"),
        (["--preset", "omniglot-2w1s"], "unknown preset"),
        (["--solver", "gmres"], "unknown solver"),
        (["--max-skip-frac", "2"], "max_skip_frac"),
        (["--flat", "sometimes"], "flat"),
        (["--cuda-graph", "always"], "cuda_graph"),
        (["--task-chunk", "0"], "task_chunk"),
        (["--cuda-graph", "on", "--no-batched"], "batched"),
        (["--cuda-graph", "on", "--device", "cpu"], "needs a CUDA device"),
    ],
)
def test_invalid_cli_values_exit_2_in_one_line(argv, match, tmp_path, capsys):
    data = make_release(tmp_path / "data")
    env_argv = ["train", *argv, "--out", str(tmp_path / "o"), "--data-dir", str(data), "--quiet"]
    code = main(env_argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], err


@needs_real
def test_n_way_larger_than_the_split_exits_2(tmp_path, capsys):
    assert main(["train", "--n-way", "2000", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2000-way tasks need 2000 classes but the split has 1100" in err[0]


SLOW_SAVE = """
import sys, time
import imaml.checkpoint as c
real = c.torch.save
def slow(obj, f):
    real(obj, f)
    f.flush()
    time.sleep(0.8)  # the temporary file is written, not yet renamed: a kill now is mid-write
c.torch.save = slow
from imaml.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_a_checkpoint_write_leaves_the_last_complete_one(tmp_path):
    out = tmp_path / "run"
    argv = [
        sys.executable,
        "-c",
        SLOW_SAVE,
        "train",
        "--task",
        "sinusoid",
        "--meta-steps",
        "6",
        "--meta-batch",
        "4",
        "--val-tasks",
        "0",
        "--checkpoint-every",
        "1",
        "--threads",
        "1",
        "--quiet",
        "--no-test",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    # wait for the second checkpoint write to be under way (the first has completed)
    while not ((out / "last.pt").exists() and list(out.glob(".last.pt.*.tmp"))):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert list(out.glob(".last.pt.*.tmp"))  # killed mid-write: a partial temporary file
    step = load_checkpoint(out / "last.pt")["step"]  # ... and the last complete checkpoint
    assert step >= 1
    done = subprocess.run(argv + ["--resume"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(out / "last.pt")["step"] == 6 and not list(out.glob(".*.tmp"))


def test_skip_rate_above_the_limit_stops_with_a_checkpoint(tmp_path, monkeypatch):
    import imaml.train as tr
    from imaml.algorithms import TaskBatch

    real = tr.make_task_families

    def poisoned(cfg, progress=True):
        fams, info = real(cfg, progress=progress)

        class OneBadTask:
            loss, metric = fams["train"].loss, fams["train"].metric
            make_model = fams["train"].make_model

            def sample(self, n, *, generator, dtype=torch.float32):
                b = fams["train"].sample(n, generator=generator, dtype=dtype)
                sx = b.support_x.clone()
                sx[0] = float("nan")  # one task in four is poisoned
                return TaskBatch(sx, *b[1:])

        return {**fams, "train": OneBadTask()}, info

    monkeypatch.setattr(tr, "make_task_families", poisoned)
    with pytest.raises(
        ValueError, match=r"25% of tasks over the last 20 meta-steps .*--max-skip-frac 0.1"
    ):
        meta_train(sinusoid(meta_steps=100), tmp_path / "r", progress=False)
    ck = load_checkpoint(tmp_path / "r" / "last.pt")
    assert ck["step"] == 20 and all(torch.isfinite(v).all() for v in ck["params"].values())
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["skipped_frac"] == 0.25 and r["query_loss"] == r["query_loss"] for r in lines)
    # with a higher limit the same run trains on the good tasks
    s = meta_train(
        sinusoid(meta_steps=25, max_skip_frac=0.5),
        tmp_path / "ok",
        progress=False,
        final_test=False,
    )
    assert s["step"] == 25
