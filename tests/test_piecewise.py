"""The piecewise iMAML meta-step (``imaml.fast.meta_grad_piecewise``, ``--compile pieces``):
the inner loop and the linear solver run outside vmap over three batched pieces. It must
compute the vmap path's numbers exactly (float64), never read the device on the host, and
refuse the settings it does not cover."""

import shutil

import pytest
import torch
from test_cuda_graph import RecordSyncs

from imaml import TaskBatch, make_algorithm
from imaml.config import ConfigError, from_preset
from imaml.fast import MetaStep
from imaml.fast.pieces import make_pieces, meta_grad_piecewise
from imaml.models import MLP

from conftest import conv_setup, rel

needs_cxx = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="no C++ compiler"
)

SETTINGS = [
    {},
    {"flat": True},
    {"solver": "cg", "flat": True},
    {"solver": "neumann", "cg_steps": 3, "lam": 50.0},  # λ where the series converges
    {"variant": "reference_code"},
    {"variant": "reference_code", "curvature": "ggn", "solver": "cg"},  # the Omniglot presets'
    {"hvp_mode": "fwd", "flat": True},
    {"cg_damping": 1.0, "lam_damping": 10.0},
    {"cg_tol": 0.3, "solver": "cg"},
    {"inner_steps": 0},
    {"task_chunk": 2},  # chunks of 2 and 1 tasks
    {"task_chunk": 1, "solver": "cg", "cg_tol": 0.3},
]


def _equal(a, b):
    (ga, sa), (gb, sb) = a, b
    assert set(ga) == set(gb) and list(sa) == list(sb)
    assert rel(ga, gb) < 1e-12
    for k, v in sb.items():
        assert sa[k].dtype == v.dtype and sa[k].shape == v.shape, k
        assert torch.allclose(sa[k].double(), v.double(), rtol=1e-12, atol=1e-14, equal_nan=True), k


@pytest.mark.parametrize("solve_piece", [False, True], ids=["matvec", "solve-piece"])
@pytest.mark.parametrize("kw", SETTINGS)
def test_piecewise_equals_the_vmap_path_in_float64(kw, solve_piece):
    """The solver through one product per step (``matvec``) or as one piece (``solve``)."""
    model, theta, batch = conv_setup(torch.float64, T=3)
    kw = {"inner_steps": 3, "lam": 0.5, **kw}
    alg = make_algorithm("imaml", model=model, **kw)
    pieces = make_pieces(alg, solve_piece=solve_piece)
    built = {k for k, f in pieces._asdict().items() if f is not None}
    assert built == {
        "inner_step",
        *(("query", "solve") if solve_piece else ("linearize", "matvec")),
    }
    out = meta_grad_piecewise(alg, theta, batch, pieces)
    _equal(out, alg.meta_grad_tensors(theta, batch))
    # not comparing a thing with itself: another λ changes the answer
    other = make_algorithm("imaml", model=model, **{**kw, "lam": 4 * kw["lam"]})
    got = meta_grad_piecewise(other, theta, batch, make_pieces(other, solve_piece=solve_piece))
    assert rel(got[0], out[0]) > 1e-6


@pytest.mark.parametrize("least", [1, 5, 6], ids=["every-task", "at-the-threshold", "below"])
@pytest.mark.parametrize("kw", [{}, {"task_chunk": 2}, {"loss": "mse"}])
def test_query_gradient_task_by_task_equals_the_vmap_path_in_float64(kw, least):
    """``query_per_task``: from ``least`` query examples per task on (5 here) the query
    gradient runs one task at a time; the meta-gradient and every statistic are the vmap
    path's, and a task left out as non-finite still is."""
    model, theta, batch = conv_setup(torch.float64, T=3)
    if kw.get("loss") == "mse":  # a regression network: no query accuracy
        model = MLP((1, 8, 1), generator=torch.Generator().manual_seed(0)).double()
        theta = {k: v.detach() for k, v in model.named_parameters()}
        x = torch.rand(3, 5, 1, dtype=torch.float64)
        batch = TaskBatch(x, x.sin(), x + 0.5, (x + 0.5).sin())
    sx = batch.support_x.clone()
    sx[1] = float("nan")
    alg = make_algorithm("imaml", model=model, inner_steps=2, **kw)
    calls = []
    pieces = make_pieces(
        alg,
        lambda f: lambda *a: calls.append(f.__name__) or f(*a),
        solve_piece=True,
        query_per_task=least,
    )
    for b in (batch, TaskBatch(sx, *batch[1:])):
        _equal(meta_grad_piecewise(alg, theta, b, pieces), alg.meta_grad_tensors(theta, b))
    per_chunk = [3] if "task_chunk" not in kw else [2, 1]
    one_by_one = ["query_one"] * sum(per_chunk) if least <= 5 else ["query"] * len(per_chunk)
    assert [c for c in calls if c.startswith("query")] == one_by_one * 2


def test_query_per_task_needs_the_solve_path():
    alg = make_algorithm("imaml", model=conv_setup()[0])
    for bad in (
        {"query_per_task": 20},
        {"query_per_task": 0, "solve_piece": True},
        {"query_per_task": 2.5, "solve_piece": True},
        {"query_per_task": True, "solve_piece": True},
    ):
        with pytest.raises(ValueError, match="query_per_task"):
            make_pieces(alg, **bad)


def test_piecewise_regression_with_forward_over_reverse_products(f64):
    """The sinusoid setting (MSE; forward-mode HVPs once failed inside F.mse_loss)."""
    g = torch.Generator().manual_seed(0)
    model = MLP((1, 8, 8, 1), generator=g)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    x = lambda: torch.rand(4, 5, 1, generator=g)
    batch = TaskBatch(x(), x(), x(), x())
    ref = make_algorithm("imaml", model=model, loss="mse", inner_steps=3).meta_grad(theta, batch)
    alg = make_algorithm("imaml", model=model, loss="mse", inner_steps=3, hvp_mode="fwd")
    _equal(meta_grad_piecewise(alg, theta, batch, make_pieces(alg)), ref)


@pytest.mark.parametrize("solve_piece", [False, True], ids=["matvec", "solve-piece"])
def test_piecewise_skips_non_finite_tasks_like_the_vmap_path(solve_piece):
    model, theta, batch = conv_setup(torch.float64, T=3)
    sx = batch.support_x.clone()
    sx[1] = float("nan")
    bad = TaskBatch(sx, *batch[1:])
    alg = make_algorithm("imaml", model=model, inner_steps=2)
    out = meta_grad_piecewise(alg, theta, bad, make_pieces(alg, solve_piece=solve_piece))
    assert out[1]["skipped"].tolist() == [False, True, False]
    _equal(out, alg.meta_grad_tensors(theta, bad))


@pytest.mark.parametrize("solve_piece", [False, True], ids=["matvec", "solve-piece"])
@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_task_chunks_give_the_whole_batch_meta_gradient(chunk, solve_piece):
    """Chunks of tasks (the last one smaller) go through the pieces one after another; a
    non-finite task in one chunk is dropped from the mean over all of them."""
    model, theta, batch = conv_setup(torch.float64, T=5)
    sx = batch.support_x.clone()
    sx[3] = float("nan")
    bad = TaskBatch(sx, *batch[1:])
    whole = make_algorithm("imaml", model=model, inner_steps=2)
    alg = make_algorithm("imaml", model=model, inner_steps=2, task_chunk=chunk)
    for b in (batch, bad):
        out = meta_grad_piecewise(alg, theta, b, make_pieces(alg, solve_piece=solve_piece))
        _equal(out, whole.meta_grad_tensors(theta, b))
    assert out[1]["skipped"].tolist() == [False, False, False, True, False]


def test_piecewise_step_never_reads_the_device_on_the_host():
    model, theta, batch = conv_setup(T=2)
    alg = make_algorithm("imaml", model=model, inner_steps=2, flat=True)
    pieces = make_pieces(alg)
    with RecordSyncs() as rec:
        meta_grad_piecewise(alg, theta, batch, pieces)
    assert rec.seen == []


@pytest.mark.parametrize(
    ("algo", "kw", "why"),
    [
        ("maml", {}, "maml"),
        ("imaml", {"inner_solver": "adam"}, "inner_solver='adam'"),
        ("imaml", {"inner_tol": 1e-3}, "inner_tol=0.001"),
        ("imaml", {"learn_lam": "scalar"}, "learn_lam='scalar'"),
        ("imaml", {"solver": "exact"}, "solver='exact'"),
        ("imaml", {"batched": False}, "batched"),
    ],
)
def test_unsupported_settings_are_refused_with_the_reason(algo, kw, why):
    model, theta, batch = conv_setup()
    alg = make_algorithm(algo, model=model, **kw)
    with pytest.raises(ValueError, match=why):
        MetaStep(alg, compile="pieces")
    if algo == "imaml" and kw.get("batched", True):
        with pytest.raises(ValueError, match="piecewise meta-step does not support"):
            meta_grad_piecewise(alg, theta, batch, make_pieces(alg))


def test_config_and_cli_compile_modes():
    cfg = from_preset("omniglot-5w1s")
    assert cfg.compile == "auto"  # pieces on CUDA for long runs (tests/test_compile.py)
    assert cfg.replace(algo="maml").compile == "auto"  # auto never refuses: it picks off
    assert cfg.replace(compile=True).compile == "step"  # configs written before the modes
    assert cfg.replace(compile=False).compile == "off"
    assert cfg.replace(compile="pieces").compile == "pieces"
    with pytest.raises(ConfigError, match="compile pieces does not support maml"):
        cfg.replace(algo="maml", compile="pieces")
    with pytest.raises(ConfigError, match="inner_solver='adam'"):
        cfg.replace(inner_solver="adam", compile="pieces")
    with pytest.raises(ConfigError, match="unknown compile 'fast'"):
        cfg.replace(compile="fast")
    with pytest.raises(ValueError, match="compile must be"):
        MetaStep(make_algorithm("imaml", model=conv_setup()[0]), compile="fast")

    from imaml.cli import build_parser

    parse = lambda *a: build_parser().parse_args(["train", *a]).compile
    assert parse("--compile") == "step" and parse("--compile", "pieces") == "pieces"
    assert parse("--compile", "auto") == "auto" and parse("--compile", "off") == "off"
    assert parse() is None  # the preset's


@needs_cxx
@pytest.mark.parametrize(
    ("chunk", "solve_piece", "per_task", "graphs"),
    [(None, None, "auto", 3), (2, None, "auto", 6), (None, False, "auto", 3), (None, None, 1, 3)],
)
def test_compiled_pieces_equal_eager_in_float64(f64, chunk, solve_piece, per_task, graphs):
    """Small MLP (compiling is slow on 2 cores); one compiled program per piece and batch
    shape (3 tasks in chunks of 2: two shapes), reused by every inner step and every
    solver step, and again on the next call. On the CPU the solver is one piece by
    default (SOLVE_PIECE); ``solve_piece=False`` compiles the product instead; with
    ``query_per_task`` the one-task query program replaces the batched one."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(0)
    model = MLP((1, 8, 8, 1), generator=g)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    x = lambda: torch.rand(3, 5, 1, generator=g)
    batch = TaskBatch(x(), x(), x(), x())
    hp = {"loss": "mse", "inner_steps": 3, "cg_steps": 3}
    ref = make_algorithm("imaml", model=model, **hp)
    alg = make_algorithm("imaml", model=model, task_chunk=chunk, **hp)
    step = MetaStep(alg, compile="pieces", solve_piece=solve_piece, query_per_task=per_task)
    assert step.solve_piece is (solve_piece is not False)
    torch._dynamo.reset()  # dynamo's per-code entries are per process: start afresh
    counters.clear()
    for shift in (0.0, 0.5):
        b = TaskBatch(batch.support_x + shift, *batch[1:])
        _equal(step(theta, b), ref.meta_grad(theta, b))
    assert counters["stats"]["unique_graphs"] == graphs  # inner step, query, solve


@needs_cxx
def test_several_compiled_algorithms_in_one_process_each_compile(f64):
    """dynamo keeps 8 compiled entries per code object; the pieces of every algorithm
    once shared vmap's wrapper code, and a third algorithm silently ran eager."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(0)
    model = MLP((1, 4, 1), generator=g)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    x = lambda: torch.rand(2, 3, 1, generator=g)
    batch = TaskBatch(x(), x(), x(), x())
    torch._dynamo.reset()  # dynamo's per-code entries are per process: start afresh
    counters.clear()
    for i in range(4):
        alg = make_algorithm("imaml", model=model, loss="mse", inner_steps=1, cg_steps=1)
        alg.lam = 1.0 + i
        MetaStep(alg, compile="pieces")(theta, batch)
    # 3 pieces for the first algorithm, then 2 each: the query gradient does not depend on
    # λ, so algorithms on one network share its program (dynamo's guards let them)
    assert counters["stats"]["unique_graphs"] == 3 + 2 * 3


def test_cpu_pieces_compile_with_our_inductor_options(monkeypatch):
    """On the CPU the pieces compile with ``CPU_PIECES_OPTIONS`` (no channels-last layouts:
    faster there, benchmarks/cpu_variants.py); the whole step with inductor's own;
    ``compile_options`` replaces ours; an unknown option fails when the step is made."""
    from imaml import fast as cuda_graph

    seen, real = [], torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda f, **kw: seen.append(kw["options"]) or real(f, **kw)
    )
    alg = make_algorithm("imaml", model=conv_setup()[0])
    assert cuda_graph.CPU_PIECES_OPTIONS == {"layout_optimization": False}
    MetaStep(alg, compile="pieces")
    # inner step, query gradient (batched and one task), solve
    assert seen == [cuda_graph.CPU_PIECES_OPTIONS] * 4
    seen.clear()
    MetaStep(alg, compile="step")
    assert seen == [None]
    seen.clear()
    MetaStep(alg, compile="pieces", compile_options={"max_autotune": False})
    assert seen == [{"max_autotune": False}] * 4
    with pytest.raises(RuntimeError, match="no_such_option"):
        MetaStep(alg, compile="pieces", compile_options={"no_such_option": 1})
    seen.clear()
    MetaStep(alg, compile="pieces", solve_piece=False)
    assert seen == [cuda_graph.CPU_PIECES_OPTIONS] * 3  # inner step, linearisation, matvec


def test_cuda_pieces_default_to_the_solve_piece_without_persistent_reductions():
    """On CUDA the pieces compile the solve as one piece, with persistent reductions off
    (Triton failed to compile the piece's fused MINRES update with them, H200 2026-11-27);
    inductor accepts the option (an unknown one fails: above)."""
    from imaml import fast as cuda_graph

    assert cuda_graph.SOLVE_PIECE == {"cpu": True, "cuda": True}
    assert cuda_graph.CUDA_PIECES_OPTIONS == {"triton.persistent_reductions": False}
    f = torch.compile(lambda x: (x * x).sum(), options=cuda_graph.CUDA_PIECES_OPTIONS)
    assert f(torch.arange(4.0)).item() == 14.0


def test_query_per_task_default_by_device_network_and_path():
    """``query_per_task="auto"``: QUERY_PER_TASK[device type] for a convolutional network on
    the solve path, else never; an explicit value is kept, and needs compile='pieces'."""
    from imaml import fast as cuda_graph

    conv = make_algorithm("imaml", model=conv_setup()[0])
    mlp = make_algorithm("imaml", model=MLP((1, 4, 1)), loss="mse")
    assert cuda_graph.QUERY_PER_TASK == {"cpu": 40, "cuda": None}
    assert MetaStep(conv, compile="pieces").query_per_task == 40
    assert MetaStep(conv, compile="pieces", solve_piece=False).query_per_task is None
    assert MetaStep(mlp, compile="pieces").query_per_task is None
    assert MetaStep(conv, compile="off").query_per_task is None
    assert MetaStep(conv, compile="pieces", query_per_task=None).query_per_task is None
    assert MetaStep(mlp, compile="pieces", query_per_task=3).query_per_task == 3
    with pytest.raises(ValueError, match="query_per_task"):
        MetaStep(conv, compile="step", query_per_task=3)
    with pytest.raises(ValueError, match="query_per_task"):
        MetaStep(conv, compile="pieces", solve_piece=False, query_per_task=3)


@pytest.mark.parametrize(
    ("compile", "solve_piece"), [("step", True), ("off", False), ("pieces", "yes")]
)
def test_solve_piece_only_for_compiled_pieces(compile, solve_piece):
    alg = make_algorithm("imaml", model=conv_setup()[0])
    with pytest.raises(ValueError, match="solve_piece"):
        MetaStep(alg, compile=compile, solve_piece=solve_piece)
    assert MetaStep(alg, compile=compile if compile != "pieces" else "off").solve_piece is False
