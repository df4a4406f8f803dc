"""The CUDA-graph meta-step: capturable (no host sync, checked on any device), equal to
the eager step, and a clean fallback where a graph does not apply."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from imaml import TaskBatch, make_algorithm
from imaml.fast import SOLVE_PIECE, MetaStep
from imaml.fast.pieces import make_pieces, meta_grad_piecewise

from conftest import conv_setup, rel

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# ops that read a device value on the host (what breaks a CUDA graph capture)
SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.masked_select.default,
}


class RecordSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


CASES = [
    ("imaml", {}),
    ("imaml", {"flat": True}),
    ("imaml", {"solver": "cg", "flat": True}),
    ("imaml", {"solver": "neumann", "lam": 50.0}),  # λ where the series converges
    ("imaml", {"learn_lam": "scalar"}),
    ("imaml", {"learn_lam": "per_tensor"}),
    ("imaml", {"inner_solver": "momentum", "inner_tol": 1e-3}),
    ("imaml", {"inner_solver": "adam"}),
    ("imaml", {"inner_solver": "newton_cg", "inner_steps": 2}),
    ("imaml", {"inner_solver": "lbfgs", "inner_steps": 2}),
    ("imaml", {"flat": False, "task_chunk": 2}),
    ("maml", {"flat": True}),
    ("fomaml", {"flat": True}),
    ("reptile", {"flat": True}),
]


@pytest.mark.parametrize(("algo", "kw"), CASES)
def test_meta_step_never_reads_the_device_on_the_host(algo, kw):
    model, theta, batch = conv_setup()
    alg = make_algorithm(algo, model=model, **{"inner_steps": 3, **kw})
    theta = alg.meta_parameters(theta)
    with RecordSyncs() as rec:
        alg.meta_grad_tensors(theta, batch)
    assert rec.seen == []
    # the detector itself is live: the checked meta_grad reads one flag on the host
    with RecordSyncs() as rec:
        alg.meta_grad(theta, batch)
    assert rec.seen


@pytest.mark.parametrize("algo", ["imaml", "maml", "fomaml", "reptile"])
def test_flat_parameters_equal_the_per_tensor_path_in_float64(algo):
    model, theta, batch = conv_setup(torch.float64, T=4)
    out = {}
    for name, kw in {
        "flat": {"flat": True},
        "dict": {"flat": False},
        "loop": {"batched": False},
    }.items():
        out[name] = make_algorithm(algo, model=model, inner_steps=4, **kw).meta_grad(theta, batch)
    for name in ("flat", "dict"):
        assert set(out[name][0]) == set(theta)
        assert rel(out[name][0], out["loop"][0]) < 1e-12
        for k, v in out["loop"][1].items():
            assert torch.allclose(out[name][1][k].double(), v.double(), rtol=1e-12, atol=1e-14), k


def test_flat_with_a_learned_scalar_lam_equals_the_loop():
    model, theta, batch = conv_setup(torch.float64, T=3)
    out = []
    for kw in ({"flat": True}, {"batched": False}):
        alg = make_algorithm("imaml", model=model, inner_steps=3, learn_lam="scalar", **kw)
        out.append(alg.meta_grad(alg.meta_parameters(theta), batch)[0])
    assert set(out[0]) == set(out[1])
    assert rel(out[0], out[1]) < 1e-12


def test_flat_must_be_a_bool_or_none():
    model, _, _ = conv_setup()
    with pytest.raises(ValueError, match="flat"):
        make_algorithm("imaml", model=model, flat="yes")


def test_task_chunks_equal_the_whole_batch():
    model, theta, batch = conv_setup(torch.float64, T=5)
    a = make_algorithm("imaml", model=model, inner_steps=3).meta_grad(theta, batch)
    b = make_algorithm("imaml", model=model, inner_steps=3, task_chunk=2).meta_grad(theta, batch)
    assert rel(b[0], a[0]) < 1e-12
    assert torch.allclose(a[1]["query_loss"], b[1]["query_loss"], rtol=1e-12)


def test_bad_task_chunk_is_rejected():
    model, _, _ = conv_setup()
    with pytest.raises(ValueError, match="task_chunk"):
        make_algorithm("imaml", model=model, task_chunk=0)


def test_meta_step_falls_back_to_eager_on_cpu():
    model, theta, batch = conv_setup(torch.float64)
    alg = make_algorithm("imaml", model=model, inner_steps=3)
    step = MetaStep(alg, mode="auto")
    g, stats = step(theta, batch)
    ref, _ = alg.meta_grad(theta, batch)
    assert rel(g, ref) == 0
    assert step.replays == 0 and not step.graphs
    with pytest.raises(ValueError, match="CUDA"):
        MetaStep(alg, mode="on")(theta, batch)
    with pytest.raises(ValueError, match="cuda_graph"):
        MetaStep(alg, mode="sometimes")
    loop = make_algorithm("imaml", model=model, inner_steps=3, batched=False)
    with pytest.raises(ValueError, match="batched"):
        MetaStep(loop, mode="on")


@cuda
@pytest.mark.parametrize("algo", ["imaml", "maml", "fomaml", "reptile"])
def test_graph_replay_equals_eager_for_fresh_inputs(algo):
    model, theta, _ = conv_setup(device="cuda", channels=16, T=4)
    alg = make_algorithm(algo, model=model, inner_steps=4)
    step = MetaStep(alg, mode="on")
    for seed in range(3):  # new parameters and tasks each call: the static inputs are refreshed
        _, _, batch = conv_setup(device="cuda", channels=16, T=4, seed=seed + 1)
        theta = {k: v + 0.01 * seed for k, v in theta.items()}
        g, stats = step(theta, batch)
        ref, ref_stats = alg.meta_grad(theta, batch)
        assert rel(g, ref) < 1e-5
        assert torch.allclose(stats["query_loss"], ref_stats["query_loss"], rtol=1e-5)
    assert step.replays == 3 and len(step.graphs) == 1 and step.fallback_reason is None


@cuda
def test_graph_recaptures_for_a_new_batch_shape():
    model, theta, batch = conv_setup(device="cuda", T=4)
    alg = make_algorithm("imaml", model=model, inner_steps=3)
    step = MetaStep(alg, mode="on")
    step(theta, batch)
    _, _, small = conv_setup(device="cuda", T=2, seed=5)
    g, _ = step(theta, small)
    assert rel(g, alg.meta_grad(theta, small)[0]) < 1e-5
    assert len(step.graphs) == 2


@cuda
def test_graph_replay_raises_when_every_task_is_non_finite():
    model, theta, batch = conv_setup(device="cuda", T=2)
    alg = make_algorithm("imaml", model=model, inner_steps=3)
    step = MetaStep(alg, mode="on")
    step(theta, batch)
    bad = TaskBatch(batch.support_x * float("nan"), *batch[1:])
    with pytest.raises(ValueError, match="non-finite"):
        step(theta, bad)


@cuda
@pytest.mark.parametrize(
    ("compile", "solve_piece"),
    [(True, None), ("pieces", None), ("pieces", False), ("pieces", True)],
)
def test_compiled_step_in_a_graph_equals_eager_in_float64(compile, solve_piece):
    """On CUDA the torch.compile'd step (whole, or in pieces: one product per solver step,
    the default there, or the solve as one piece) is what the graph captures."""
    from imaml.models import MLP

    g = torch.Generator().manual_seed(0)
    model = MLP((1, 8, 8, 1), generator=g).to("cuda", torch.float64)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    x = lambda: torch.rand(3, 5, 1, generator=g, dtype=torch.float64).cuda()
    batch = TaskBatch(x(), x(), x(), x())
    alg = make_algorithm("imaml", model=model, loss="mse", inner_steps=2, cg_steps=2)
    step = MetaStep(alg, mode="on", compile=compile, solve_piece=solve_piece)
    chosen = SOLVE_PIECE["cuda"] if solve_piece is None else solve_piece
    assert step.solve_piece is (compile == "pieces" and chosen)
    for shift in (0.0, 0.5):
        b = TaskBatch(batch.support_x + shift, *batch[1:])
        assert rel(step(theta, b)[0], alg.meta_grad(theta, b)[0]) < 1e-12
    assert step.replays == 2 and step.fallback_reason is None


@cuda
def test_cuda_pieces_compile_with_the_cuda_options(monkeypatch):
    """On CUDA the pieces compile with ``CUDA_PIECES_OPTIONS``; the whole step with
    inductor's own."""
    from imaml import fast as cuda_graph

    seen, real = [], torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda f, **kw: seen.append(kw["options"]) or real(f, **kw)
    )
    alg = make_algorithm("imaml", model=conv_setup(device="cuda")[0])
    step = MetaStep(alg, compile="pieces")
    assert step.solve_piece and step.query_per_task is None
    assert seen and all(o == cuda_graph.CUDA_PIECES_OPTIONS for o in seen)
    seen.clear()
    MetaStep(alg, compile="step")
    assert seen == [None]


@cuda
@pytest.mark.parametrize("solve_piece", [False, True], ids=["matvec", "solve-piece"])
def test_piecewise_step_in_a_graph_equals_the_vmap_path(solve_piece):
    """The piecewise step (uncompiled pieces) captured as a CUDA graph, fresh inputs."""
    model, theta, _ = conv_setup(device="cuda", channels=16, T=4)
    alg = make_algorithm("imaml", model=model, inner_steps=4, flat=True)
    step = MetaStep(alg, mode="on")
    pieces = make_pieces(alg, solve_piece=solve_piece)
    step.step = lambda p, b: meta_grad_piecewise(alg, p, b, pieces)
    for seed in range(2):
        _, _, batch = conv_setup(device="cuda", channels=16, T=4, seed=seed + 1)
        g, stats = step(theta, batch)
        ref, ref_stats = alg.meta_grad(theta, batch)
        assert rel(g, ref) < 1e-4
        assert torch.allclose(stats["query_loss"], ref_stats["query_loss"], rtol=1e-5)
    assert step.replays == 2 and step.fallback_reason is None
