"""torch.compile of the meta-step (``MetaStep(compile=True)``, ``--compile``).

Compiling is slow on 2 cores (tens of seconds even for these tiny networks), so the
models here are small MLPs and the inner loop short; the property tested is that the
compiled step computes the eager step's numbers.
"""

import json
import shutil

import pytest
import torch

from imaml import TaskBatch, make_algorithm
from imaml.checkpoint import load_checkpoint
from imaml.config import ConfigError, from_preset
from imaml.fast import MetaStep
from imaml.models import MLP

from conftest import rel

# inductor compiles C++ on the CPU; without a compiler --compile fails with a clear error
# (tested below with a simulated failure) and the compiling tests cannot run
needs_cxx = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="no C++ compiler"
)


def _setup(dtype):
    g = torch.Generator().manual_seed(0)
    model = MLP((1, 8, 8, 1), generator=g).to(dtype)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    x = lambda: torch.rand(3, 5, 1, generator=g, dtype=dtype)
    return model, theta, TaskBatch(x(), x(), x(), x())


@needs_cxx
def test_compiled_step_equals_eager_in_float64(f64):
    model, theta, batch = _setup(torch.float64)
    alg = make_algorithm(
        "imaml", model=model, loss="mse", lam=2.0, inner_steps=2, inner_lr=0.1, cg_steps=2
    )
    step = MetaStep(alg, compile=True)
    for shift in (0.0, 0.5):  # a second call with new values reuses the compiled program
        b = TaskBatch(batch.support_x + shift, *batch[1:])
        mean, stats = step(theta, b)
        ref_mean, ref_stats = alg.meta_grad(theta, b)
        assert rel(mean, ref_mean) < 1e-12
        for k in ref_stats:
            assert torch.allclose(stats[k].double(), ref_stats[k].double(), rtol=1e-12, atol=1e-12)


@needs_cxx
def test_compiled_step_still_refuses_an_all_non_finite_batch(f64):
    model, theta, batch = _setup(torch.float64)
    alg = make_algorithm("fomaml", model=model, loss="mse", inner_steps=1, inner_lr=0.1)
    step = MetaStep(alg, compile=True)
    bad = TaskBatch(batch.support_x * float("nan"), *batch[1:])
    with pytest.raises(ValueError, match="non-finite"):
        step(theta, bad)


def test_compile_failure_is_a_clear_error(monkeypatch):
    model, theta, batch = _setup(torch.float32)
    alg = make_algorithm("imaml", model=model, loss="mse", inner_steps=1, cg_steps=1)
    step = MetaStep(alg, compile=True)

    def broken(params, batch):
        raise torch._dynamo.exc.TorchDynamoException("no working C++ compiler found")

    monkeypatch.setattr(step, "step", broken)
    with pytest.raises(ValueError, match="torch.compile of the meta-step failed.*--compile"):
        step(theta, batch)


def test_compile_needs_the_batched_path():
    model, _, _ = _setup(torch.float32)
    alg = make_algorithm("imaml", model=model, loss="mse", batched=False)
    with pytest.raises(ValueError, match="batched"):
        MetaStep(alg, compile=True)
    with pytest.raises(ConfigError, match="compile needs the batched path"):
        from_preset("sinusoid").replace(compile=True, batched=False)


@needs_cxx
def test_training_with_compile_matches_eager(tmp_path):
    from imaml.train import meta_train

    cfg = from_preset("sinusoid").replace(
        meta_steps=3, meta_batch=4, val_tasks=0, test_tasks=10, inner_steps=2
    )
    params = {}
    for mode in ("step", "pieces", "off"):
        out = tmp_path / mode
        meta_train(cfg.replace(compile=mode), out, progress=False, final_test=False)
        ckpt = load_checkpoint(out / "last.pt")
        params[mode] = ckpt["params"]
        assert ckpt["config"]["compile"] == mode
    assert rel(params["step"], params["off"]) < 1e-5
    assert rel(params["pieces"], params["off"]) < 1e-5


def test_cli_without_a_working_compiler_is_one_line_and_exit_2(tmp_path):
    """A real failure: inductor pointed at a C++ compiler that does not exist."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++")}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "cache")  # nothing compiled to reuse
    argv = ["train", "--preset", "sinusoid", "--compile", "--meta-steps", "2"]
    argv += ["--val-tasks", "0", "--no-test", "--quiet", "--out", str(tmp_path / "run")]
    out = subprocess.run(
        [sys.executable, "-m", "imaml", *argv], capture_output=True, text=True, env=env
    )
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "torch.compile of the meta-step failed" in err[0]
    assert "run without --compile" in err[0]
    assert not (tmp_path / "run" / "last.pt").exists()  # nothing half-written


# -- --compile auto -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algo", "kw", "device", "steps", "expected"),
    [
        ("imaml", {}, "cuda", 5000, "pieces"),  # long enough to repay ~70 s of compiling
        ("imaml", {}, "cuda:1", 20000, "pieces"),
        ("imaml", {}, "cuda", 4999, "off"),
        ("imaml", {}, "cpu", 1000, "pieces"),  # 0.92 vs 1.16 s per step there
        ("imaml", {}, "cpu", 999, "off"),
        ("imaml", {}, "meta", 20000, "off"),  # a device type without a measured threshold
        ("imaml", {"inner_solver": "adam"}, "cuda", 20000, "off"),  # pieces do not apply
        ("imaml", {"batched": False}, "cpu", 20000, "off"),
        ("maml", {}, "cuda", 20000, "off"),
    ],
)
def test_compile_auto_picks_the_pieces_where_they_apply_and_pay(algo, kw, device, steps, expected):
    from imaml.fast import AUTO_COMPILE_MIN_STEPS, auto_compile

    assert AUTO_COMPILE_MIN_STEPS == {"cuda": 5000, "cpu": 1000}
    model, _, _ = _setup(torch.float32)
    alg = make_algorithm(algo, model=model, loss="mse", **kw)
    assert auto_compile(alg, device, steps=steps) == expected


@pytest.mark.parametrize(
    ("device", "compile", "expected"),
    [
        ("cuda", "pieces", "fwd"),  # 16.4 vs 17.6 ms on an H200
        ("cuda:1", "pieces", "fwd"),
        ("cuda", "off", "rev"),  # the eager graph: 32.0 vs 33.2 ms
        ("cuda", "step", "rev"),
        ("cpu", "pieces", "rev"),  # no gain measured on the CPU
        ("cpu", "off", "rev"),
    ],
)
def test_hvp_mode_auto_is_forward_over_reverse_for_compiled_pieces_on_cuda(
    device, compile, expected
):
    from imaml.fast import auto_hvp_mode

    assert auto_hvp_mode(device, compile) == expected


def test_training_resolves_hvp_mode_auto_by_the_step_it_runs(tmp_path, monkeypatch):
    """--hvp-mode auto (the default) trains with the products auto_hvp_mode picks for the
    device and compile mode: reverse mode here; made to pick fwd, the run equals one with
    --hvp-mode fwd bit for bit. The config keeps "auto", so a resumed run chooses again."""
    import imaml.train as tr

    cfg = from_preset("sinusoid", meta_steps=2, val_tasks=0)
    assert cfg.hvp_mode == "auto" and cfg.algorithm_kwargs()["hvp_mode"] == "rev"
    assert (
        tr.meta_train(cfg, tmp_path / "rev", progress=False, final_test=False)["hvp_mode"] == "rev"
    )
    seen = []
    monkeypatch.setattr(tr, "auto_hvp_mode", lambda device, mode: seen.append(mode) or "fwd")
    s = tr.meta_train(cfg, tmp_path / "auto", progress=False, final_test=False)
    assert s["hvp_mode"] == "fwd" and seen == ["off"]
    assert load_checkpoint(tmp_path / "auto" / "last.pt")["config"]["hvp_mode"] == "auto"
    monkeypatch.undo()
    fwd = cfg.replace(hvp_mode="fwd")
    assert (
        tr.meta_train(fwd, tmp_path / "fwd", progress=False, final_test=False)["hvp_mode"] == "fwd"
    )
    a, b, r = (load_checkpoint(tmp_path / x / "last.pt")["params"] for x in ("auto", "fwd", "rev"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], r[k]) for k in a)  # the two modes round differently
    with pytest.raises(ConfigError, match="hvp_mode"):
        from_preset("sinusoid", hvp_mode="forward")


def test_a_failed_compile_with_fallback_warns_once_and_runs_uncompiled(monkeypatch):
    model, theta, batch = _setup(torch.float64)
    alg = make_algorithm("imaml", model=model, loss="mse", inner_steps=2, cg_steps=2)
    step = MetaStep(alg, compile="pieces", fallback=True, solve_piece=False)

    def broken(params, batch):
        raise torch._dynamo.exc.TorchDynamoException("no working C++ compiler found")

    monkeypatch.setattr(step, "step", broken)
    with pytest.warns(RuntimeWarning, match=r"torch.compile \(pieces\).*running it uncompiled"):
        g, _ = step(theta, batch)
    assert step.compile == "off" and "no working C++ compiler" in step.compile_error
    want, _ = alg.meta_grad_tensors(theta, batch)
    assert all(torch.equal(g[k], want[k]) for k in want)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        step(theta, batch)
    # an error that is not a failed compilation is not absorbed
    step2 = MetaStep(alg, compile="pieces", fallback=True, solve_piece=False)
    monkeypatch.setattr(step2, "step", lambda p, b: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        step2(theta, batch)


@pytest.mark.parametrize("product_fails", [False, True])
def test_a_default_solve_piece_that_fails_falls_back_to_the_product_pieces(
    monkeypatch, product_fails
):
    """Triton once failed on the solve piece alone (CUDA, fourth loan): with fallback, a
    default solve piece that fails to compile gives way to one compiled product per solver
    step, and only if that fails too to the uncompiled step. The pieces are left
    uncompiled here (compiling takes minutes on 2 cores); what fails is made to."""
    model, theta, batch = _setup(torch.float64)
    alg = make_algorithm("imaml", model=model, loss="mse", inner_steps=2, cg_steps=2)
    import imaml.fast.step as fast_step

    real = fast_step.make_pieces
    made = []

    def pieces(alg, wrap, *, solve_piece, query_per_task):
        made.append(solve_piece)
        out = real(alg, solve_piece=solve_piece, query_per_task=query_per_task)
        if solve_piece or product_fails:

            def broken(*a):
                raise torch._dynamo.exc.TorchDynamoException("PassManager::run failed")

            field = "solve" if solve_piece else "matvec"
            out = out._replace(**{field: broken})
        return out

    monkeypatch.setattr(fast_step, "make_pieces", pieces)
    step = MetaStep(alg, compile="pieces", fallback=True)
    assert step.solve_piece and made == [True]
    with pytest.warns(RuntimeWarning, match="with the solve piece.*one Hessian-vector product"):
        g, _ = step(theta, batch)
    assert made == [True, False] and step.solve_piece is False
    assert "PassManager::run failed" in step.compile_error
    assert step.compile == ("off" if product_fails else "pieces")
    want, _ = alg.meta_grad_tensors(theta, batch)
    assert rel(g, want) < 1e-12
    # asked for by name, the solve piece does not fall back to the product
    made.clear()
    named = MetaStep(alg, compile="pieces", fallback=True, solve_piece=True)
    with pytest.warns(RuntimeWarning, match="running it uncompiled"):
        named(theta, batch)
    assert made == [True] and named.compile == "off"


def test_training_defaults_to_compile_auto_off_for_a_short_schedule(tmp_path):
    from imaml.train import meta_train

    cfg = from_preset("sinusoid", meta_steps=2, val_tasks=0)
    assert cfg.compile == "auto"
    s = meta_train(cfg, tmp_path / "r", progress=False, final_test=False)
    off = {"mode": "off", "fallback": None, "solve_piece": False, "query_per_task": None}
    off["options"] = {}
    assert s["compile"] == off
    assert load_checkpoint(tmp_path / "r" / "last.pt")["config"]["compile"] == "auto"


@needs_cxx
def test_compile_auto_chooses_by_the_whole_schedule_so_resume_is_exact(tmp_path, monkeypatch):
    """A 1,000-step schedule compiles the pieces on the CPU; stopped after 2 steps and
    resumed, the run makes the same choice and ends with the uninterrupted run's
    parameters, bit for bit (run 3 steps of it: the schedule, not the steps done, decides)."""
    import imaml.train as tr

    cfg = from_preset("sinusoid", meta_steps=1000, val_tasks=0, val_every=1000, threads=1)
    s = tr.meta_train(cfg, tmp_path / "a", progress=False, final_test=False, max_steps_this_run=3)
    # the sinusoid MLP: the solve piece (the CPU's default), its query gradient under vmap
    pieces = {"mode": "pieces", "fallback": None, "solve_piece": True, "query_per_task": None}
    pieces["options"] = {"layout_optimization": False}  # CPU_PIECES_OPTIONS
    assert s["compile"] == pieces
    tr.meta_train(cfg, tmp_path / "b", progress=False, final_test=False, max_steps_this_run=2)
    s = tr.meta_train(
        None, tmp_path / "b", resume=True, progress=False, final_test=False, max_steps_this_run=1
    )
    assert s["compile"]["mode"] == "pieces" and s["step"] == 3
    a, b = (load_checkpoint(tmp_path / x / "last.pt")["params"] for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compile_auto_survives_a_missing_compiler(tmp_path):
    """A real failure under auto (made to choose the pieces on the CPU): a warning, and the
    run trains uncompiled to the same parameters as --compile off."""
    import os
    import subprocess
    import sys

    from imaml.train import meta_train

    code = (
        "import json, sys\n"
        "import imaml.train as tr\n"
        "from imaml.config import from_preset\n"
        "tr.auto_compile = lambda *args, **kwargs: 'pieces'\n"
        "cfg = from_preset('sinusoid', meta_steps=3, val_tasks=0)\n"
        "s = tr.meta_train(cfg, sys.argv[1], progress=False, final_test=False)\n"
        "print(json.dumps(s['compile']))\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++")}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "cache")  # nothing compiled to reuse
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "auto")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["mode"] == "pieces" and report["fallback"]
    assert "running it uncompiled" in out.stderr
    cfg = from_preset("sinusoid", meta_steps=3, val_tasks=0, compile="off")
    meta_train(cfg, tmp_path / "off", progress=False, final_test=False)
    a, b = (load_checkpoint(tmp_path / x / "last.pt")["params"] for x in ("auto", "off"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_under_fallback_a_compiled_step_the_graph_cannot_capture_is_captured_uncompiled(
    monkeypatch,
):
    """On CUDA, compiled pieces run outside a graph are slower than the uncompiled graph,
    so under fallback a failed capture of the compiled step drops the compilation, not the
    graph. (The capture is simulated: this runs on the CPU.)"""
    import imaml.fast.graph as fast_graph

    model, theta, batch = _setup(torch.float64)
    alg = make_algorithm("imaml", model=model, loss="mse", inner_steps=2, cg_steps=2)

    class Capture:  # stands in for imaml.fast.graph.Captured: only the uncompiled step can be captured
        def __init__(self, step, params, batch, warmup):
            if step != alg.meta_grad_tensors:
                raise RuntimeError("operation not permitted when stream is capturing")
            self.step = step

        def __call__(self, params, batch):
            return self.step(params, batch)

    monkeypatch.setattr(fast_graph, "Captured", Capture)
    monkeypatch.setattr(MetaStep, "applies", lambda self, params, batch: True)
    step = MetaStep(alg, compile="pieces", fallback=True)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture of the torch.compile"):
        g, _ = step(theta, batch)
    assert step.replays == 1 and step.fallback_reason is None and step.compile == "off"
    want, _ = alg.meta_grad_tensors(theta, batch)
    assert all(torch.equal(g[k], want[k]) for k in want)
    # without fallback the capture failure is the graph's, handled as before
    assert not MetaStep(alg, compile="pieces")._compile_failed(RuntimeError(), in_capture=True)


def test_cli_compile_auto_without_a_compiler_warns_in_one_line_and_trains(tmp_path):
    """The default on a long schedule, on a machine without a working C++ compiler: a
    warning line per attempt (the solve piece, then the product pieces), training goes on
    uncompiled, and the summary says so."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++")}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "cache")  # nothing compiled to reuse
    argv = ["train", "--preset", "sinusoid", "--meta-steps", "1000", "--time-budget", "0.02"]
    argv += ["--val-tasks", "0", "--no-test", "--quiet", "--out", str(tmp_path / "run")]
    out = subprocess.run(
        [sys.executable, "-m", "imaml", *argv], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    warned = [x for x in out.stderr.splitlines() if x.startswith("imaml: warning:")]
    assert len(warned) == 2 and "compiling one Hessian-vector product" in warned[0]
    assert "running it uncompiled (--compile off" in warned[1]
    assert "Traceback" not in out.stderr
    assert "uncompiled after torch.compile pieces failed" in out.stdout
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] >= 1
