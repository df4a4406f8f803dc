"""Bring your own model and loss: adapt_implicit, ordinary layers, checks at the boundary."""

import pytest
import torch
from torch import nn

import imaml
from imaml import TaskBatch, adapt, adapt_implicit, implicit_meta_grad, make_algorithm

from conftest import conv_setup, rel

ALGOS = ["imaml", "maml", "fomaml", "reptile"]


def quadratic_problem(seed=0, n=5):
    """L̂(φ; w) = ½φᵀQφ − (Mw)ᵀφ, L(φ) = ½‖φ − t‖²: φ* = (Q + λI)⁻¹(λθ + Mw) in closed form."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    Q = B @ B.T / n + 0.5 * torch.eye(n, dtype=torch.float64)
    M = torch.randn(n, 3, generator=g, dtype=torch.float64)
    t = torch.randn(n, generator=g, dtype=torch.float64)
    theta = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.randn(3, generator=g, dtype=torch.float64)
    return Q, M, t, theta, w


def test_adapt_implicit_gradients_equal_the_closed_form_for_theta_lambda_and_a_closure():
    Q, M, t, theta0, w0 = quadratic_problem()
    theta = {"w": theta0.clone().requires_grad_()}
    w = w0.clone().requires_grad_()  # a meta-parameter outside θ, in the support loss
    lam = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)  # a learned λ
    support = lambda p: 0.5 * p["w"] @ Q @ p["w"] - (M @ w) @ p["w"]
    phi = adapt_implicit(support, theta, lam=lam, inner_steps=3000, inner_lr=0.2, solver="exact")
    (0.5 * ((phi["w"] - t) ** 2).sum()).backward()

    th, w2, l2 = (x.detach().clone().requires_grad_() for x in (theta0, w0, lam))
    star = torch.linalg.solve(Q + l2 * torch.eye(5, dtype=torch.float64), l2 * th + M @ w2)
    (0.5 * ((star - t) ** 2).sum()).backward()
    assert rel(phi["w"].detach(), star.detach()) < 1e-12
    assert rel(theta["w"].grad, th.grad) < 1e-10
    assert rel(w.grad, w2.grad) < 1e-10
    assert rel(lam.grad, l2.grad) < 1e-10


def test_adapt_implicit_composes_with_other_losses_in_one_backward():
    Q, M, t, theta0, w0 = quadratic_problem(1)
    support = lambda p: 0.5 * p["w"] @ Q @ p["w"] - (M @ w0) @ p["w"]
    grads = []
    for extra in (0.0, 1.0):
        theta = {"w": theta0.clone().requires_grad_()}
        phi = adapt_implicit(
            support, theta, lam=2.0, inner_steps=2000, inner_lr=0.2, solver="exact"
        )
        (0.5 * ((phi["w"] - t) ** 2).sum() + extra * (theta["w"] ** 2).sum()).backward()
        grads.append(theta["w"].grad)
    assert rel(grads[1] - grads[0], 2 * theta0) < 1e-12  # the other loss's gradient adds


def test_adapt_implicit_on_a_network_equals_implicit_meta_grad_and_reports_its_solve(f64):
    model, theta0, batch = conv_setup(torch.float64, T=1, channels=3)
    alg = make_algorithm("imaml", model=model)
    sx, sy, qx, qy = batch.task(0)
    support, query = alg.loss_of(sx, sy), alg.loss_of(qx, qy)
    theta = {k: v.clone().requires_grad_() for k, v in theta0.items()}
    phi, stats = adapt_implicit(
        support,
        theta,
        lam=2.0,
        inner_steps=4,
        inner_lr=0.1,
        solver="minres",
        steps=8,
        return_stats=True,
    )
    assert "solver_residual" not in stats and stats["iterations"] == 4
    query(phi).backward()
    ref_phi = adapt(support, theta0, lam=2.0, inner_steps=4, inner_lr=0.1)
    g, info = implicit_meta_grad(
        support, query, theta0, ref_phi, lam=2.0, solver="minres", steps=8, return_stats=True
    )
    assert rel({k: v.grad for k, v in theta.items()}, g) < 1e-10
    assert float(stats["solver_residual"]) == pytest.approx(float(info["residual"]), rel=1e-8)
    assert set(info) >= {"iterations", "residual", "negative_curvature", "diverged"}


def test_adapt_implicit_refuses_bad_hyperparameters():
    support = lambda p: (p["w"] ** 2).sum()
    theta = {"w": torch.ones(3, requires_grad=True)}
    for kw, match in [
        ({"lam": 0.0}, "lam"),
        ({"lam": 1.0, "solver": "qr"}, "unknown solver"),
        ({"lam": 1.0, "curvature": "fisher"}, "unknown curvature"),
        ({"lam": 1.0, "inner_lr": 0.0}, "inner_lr"),
    ]:
        kw = {"inner_steps": 2, "inner_lr": 0.1, **kw}
        with pytest.raises(ValueError, match=match):
            adapt_implicit(support, theta, **kw)


def two_layer(frozen=False, dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    if frozen:
        model[0].requires_grad_(False)
    return model


def regression_batch(T=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = lambda: torch.randn(T, 6, 3, generator=g, dtype=dtype)
    y = lambda: torch.randn(T, 6, 2, generator=g, dtype=dtype)
    return TaskBatch(x(), y(), x(), y())


@pytest.mark.parametrize("algo", ALGOS)
def test_a_callable_loss_equals_the_named_one(algo):
    model = two_layer()
    params = dict(model.named_parameters())
    batch = regression_batch()
    named = make_algorithm(algo, model=model, loss="mse", inner_steps=3).meta_grad(params, batch)
    mine = lambda out, y: ((out - y) ** 2).mean()
    own = make_algorithm(algo, model=model, loss=mine, inner_steps=3).meta_grad(params, batch)
    assert rel(own[0], named[0]) < 1e-14


def test_a_callable_loss_must_return_a_scalar():
    alg = make_algorithm("fomaml", model=two_layer(), loss=lambda out, y: (out - y) ** 2)
    with pytest.raises(ValueError, match="scalar tensor"):
        alg.meta_grad(dict(alg.model.named_parameters()), regression_batch())


@pytest.mark.parametrize("algo", ALGOS)
def test_frozen_parameters_are_neither_adapted_nor_meta_trained(algo):
    model = two_layer(frozen=True)
    params = dict(model.named_parameters())
    alg = make_algorithm(algo, model=model, loss="mse", inner_steps=3)
    g, _ = alg.meta_grad(params, regression_batch())
    assert set(g) == {"2.weight", "2.bias"}
    # the same as a model whose first layer is a constant function of the input
    first = model[0]
    head = nn.Sequential(nn.Tanh(), nn.Linear(8, 2)).double()
    head[1].load_state_dict(model[2].state_dict())
    b = regression_batch()
    with torch.no_grad():
        pre = TaskBatch(first(b.support_x), b.support_y, first(b.query_x), b.query_y)
    ref = make_algorithm(algo, model=head, loss="mse", inner_steps=3)
    g_ref, _ = ref.meta_grad(dict(head.named_parameters()), pre)
    assert rel(g["2.weight"], g_ref["1.weight"]) < 1e-12


def bn_net(track: bool):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2),
        nn.BatchNorm2d(4, track_running_stats=track),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    ).double()


def image_batch(T=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    x = lambda: torch.rand(T, 5, 1, 14, 14, generator=g, dtype=dtype)
    y = torch.arange(5).repeat(T, 1)
    return TaskBatch(x(), y, x(), y)


@pytest.mark.parametrize("algo", ALGOS)
def test_batchnorm_with_running_statistics_uses_batch_statistics_and_is_left_untouched(algo):
    out = {}
    for track in (True, False):
        model = bn_net(track)
        model.eval()  # even in eval mode the algorithms normalise with each task's batch
        alg = make_algorithm(algo, model=model, inner_steps=2)
        out[track] = alg.meta_grad(dict(model.named_parameters()), image_batch())[0]
        if track:
            bn = model[1]
            assert bn.num_batches_tracked.item() == 0 and torch.equal(
                bn.running_mean, torch.zeros(4, dtype=torch.float64)
            )
            assert not bn.training and bn.track_running_stats  # restored
    assert rel(out[True], out[False]) < 1e-12


def test_dropout_draws_a_mask_per_task_from_the_global_generator():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(14 * 14, 5)).double()
    alg = make_algorithm("fomaml", model=model, inner_steps=1)
    b = image_batch(T=1)
    same = TaskBatch(*(t.expand(4, *t.shape[1:]) for t in b))  # four copies of one task
    params = dict(model.named_parameters())
    torch.manual_seed(1)
    _, stats = alg.meta_grad(params, same)
    assert len(set(stats["query_loss"].tolist())) == 4  # four different masks
    torch.manual_seed(1)
    _, again = alg.meta_grad(params, same)
    assert torch.equal(stats["query_loss"], again["query_loss"])  # seeded


@pytest.mark.parametrize("algo", ALGOS)
def test_state_dict_with_integer_buffers_is_accepted(algo):
    model = bn_net(True)
    alg = make_algorithm(algo, model=model, inner_steps=2)
    g, _ = alg.meta_grad(model.state_dict(), image_batch())
    g_ref, _ = alg.meta_grad(dict(model.named_parameters()), image_batch())
    assert set(g) == set(g_ref) and rel(g, g_ref) < 1e-14


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("algo", ALGOS)
def test_bad_inputs_give_one_line_naming_the_argument(algo):
    model = bn_net(False)
    alg = make_algorithm(algo, model=model, inner_steps=1)
    params = dict(model.named_parameters())
    b = image_batch()
    cases = [
        ({**params, "extra.weight": torch.ones(1)}, b, "extra.weight"),
        ({k: v for k, v in params.items() if k != "4.bias"}, b, "4.bias"),
        (
            params,
            TaskBatch(b.support_x, b.support_y[:2], b.query_x, b.query_y),
            "different numbers of tasks",
        ),
        (params, TaskBatch(*(t[:0] for t in b)), "no tasks"),
        (params, b.task(0), "task dimension"),
        (
            params,
            TaskBatch(b.support_x.float(), b.support_y, b.query_x.float(), b.query_y),
            "float",
        ),
        (
            params,
            TaskBatch(b.support_x[:, :0], b.support_y[:, :0], b.query_x, b.query_y),
            "support_x has no examples",
        ),
    ]
    for p, batch, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            alg.meta_grad(p, batch)
        one_line(err)


def test_adapt_validates_its_numbers_and_options():
    support = lambda p: (p["w"] ** 2).sum()
    theta = {"w": torch.ones(3)}
    for kw, match in [
        ({"lam": -1.0}, "lam"),
        ({"inner_steps": -1}, "inner_steps"),
        ({"inner_lr": 0.0}, "inner_lr"),
        ({"options": {"cg_stesp": 3}}, "unknown inner-solver options"),
        ({"tol": -1.0}, "tol"),
    ]:
        kw = {"lam": 1.0, "inner_steps": 2, "inner_lr": 0.1, **kw}
        with pytest.raises(ValueError, match=match) as err:
            adapt(support, theta, **kw)
        one_line(err)
    # an option another solver takes is fine (one options dict serves every solver)
    adapt(support, theta, lam=1.0, inner_steps=2, inner_lr=0.1, options={"cg_steps": 3})


def test_a_diverging_neumann_solve_is_flagged_and_its_task_skipped(f64):
    model, theta, batch = conv_setup(torch.float64, T=3)
    alg = make_algorithm("imaml", model=model, lam=0.5, inner_steps=2, solver="neumann", cg_steps=4)
    g, stats = alg.meta_grad_tensors(theta, batch)
    assert bool(stats["solver_diverged"].all()) and bool(stats["skipped"].all())
    with pytest.raises(ValueError, match="every task"):
        alg.meta_grad(theta, batch)
    ok = make_algorithm("imaml", model=model, lam=50.0, inner_steps=2, solver="neumann", cg_steps=4)
    _, stats = ok.meta_grad(theta, batch)
    assert not bool(stats["solver_diverged"].any()) and not bool(stats["skipped"].any())


def test_exported():
    assert imaml.adapt_implicit is adapt_implicit
