import pytest
import torch
from torch.func import grad

from imaml import adapt, implicit_meta_grad, make_algorithm
from imaml.implicit import lam_gradient, solve_implicit
from imaml.inner import proximal_objective
from imaml.inner_optim import INNER_SOLVERS
from imaml.params import norm

from conftest import rel

LR = {"gd": 0.5, "momentum": 0.1, "adam": 0.02, "newton_cg": 1.0, "lbfgs": 1.0}
STEPS = {"gd": 3000, "momentum": 3000, "adam": 5000, "newton_cg": 30, "lbfgs": 200}
OPTS = {"newton_cg": {"cg_steps": 20}}


def quadratic(n=12, cond=50.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.logspace(-torch.log10(torch.tensor(cond)).item(), 0, n, dtype=torch.float64)
    A = Q @ torch.diag(eig) @ Q.T
    c = torch.randn(n, generator=g, dtype=torch.float64)
    flat = lambda p: torch.cat([p["w"].reshape(-1), p["b"]])
    L = lambda p: 0.5 * flat(p) @ A @ flat(p) - c @ flat(p)
    theta = {
        "w": torch.randn(2, 5, generator=g, dtype=torch.float64),
        "b": torch.randn(2, generator=g, dtype=torch.float64),
    }
    return L, theta, A, c, flat


def logistic(seed=0, n=40, d=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.sign(torch.randn(n, generator=g, dtype=torch.float64))
    L = lambda p: torch.nn.functional.softplus(-y * (x @ p["w"] + p["b"])).mean()
    theta = {
        "w": torch.randn(d, generator=g, dtype=torch.float64),
        "b": torch.zeros((), dtype=torch.float64),
    }
    return L, theta


def reference_optimum(G, theta):
    """Dense Newton's method to machine precision."""
    from imaml.params import ravel

    x, unravel = ravel(theta)
    f = lambda v: G(unravel(v))
    for _ in range(50):
        gr = torch.func.grad(f)(x)
        H = torch.autograd.functional.hessian(f, x)
        x = x - torch.linalg.solve(H, gr)
    return unravel(x)


@pytest.mark.parametrize("solver", list(INNER_SOLVERS))
@pytest.mark.parametrize("problem", ["quadratic", "logistic"])
def test_each_solver_reaches_tolerance_and_the_optimum(solver, problem):
    lam = 0.5
    if problem == "quadratic":
        L, theta, A, c, flat = quadratic()
        ref = torch.linalg.solve(
            A + lam * torch.eye(12, dtype=torch.float64), c + lam * flat(theta)
        )
    else:
        L, theta = logistic()
        flat = lambda p: torch.cat([p["w"].reshape(-1), p["b"].reshape(1)])
        ref = flat(reference_optimum(proximal_objective(L, theta, lam=lam), theta))
    phi, info = adapt(
        L,
        theta,
        lam=lam,
        inner_steps=STEPS[solver],
        inner_lr=LR[solver],
        solver=solver,
        tol=1e-8,
        options=OPTS.get(solver),
        return_info=True,
    )
    G = proximal_objective(L, theta, lam=lam)
    assert norm(grad(G)(phi)) <= 1e-8
    assert info["iterations"] < STEPS[solver]  # stopped by the tolerance, not the cap
    assert rel(flat(phi), ref) < 1e-7


def test_newton_cg_needs_far_fewer_iterations_than_gd_when_ill_conditioned():
    L, theta, *_ = quadratic(cond=1e3)
    lam = 1e-3  # κ(A + λI) ≈ 500
    its = {}
    for solver, lr, steps in (("gd", 0.9, 50000), ("newton_cg", 1.0, 50)):
        _, info = adapt(
            L,
            theta,
            lam=lam,
            inner_steps=steps,
            inner_lr=lr,
            solver=solver,
            tol=1e-8,
            options={"cg_steps": 20},
            return_info=True,
        )
        its[solver] = int(info["iterations"])
    assert its["newton_cg"] <= 5 and its["gd"] > 1000, its


def test_implicit_meta_gradient_is_the_same_after_any_two_converged_solvers():
    L, theta = logistic(seed=1)
    query = lambda p: ((p["w"] - 1.0) ** 2).sum() + p["b"] ** 2
    grads = {}
    for solver in ("gd", "newton_cg", "lbfgs", "adam"):
        phi = adapt(
            L,
            theta,
            lam=0.5,
            inner_steps=STEPS[solver],
            inner_lr=LR[solver],
            solver=solver,
            tol=1e-10,
            options=OPTS.get(solver),
        )
        grads[solver] = implicit_meta_grad(L, query, theta, phi, lam=0.5, solver="exact")
    for s in ("newton_cg", "lbfgs", "adam"):
        assert rel(grads[s], grads["gd"]) < 1e-7


@pytest.mark.parametrize("solver", list(INNER_SOLVERS))
def test_vmap_equals_loop_with_per_task_stopping(solver):
    g = torch.Generator().manual_seed(3)
    T, d = 4, 5
    xs = (
        torch.randn(T, 30, d, generator=g, dtype=torch.float64)
        * torch.linspace(0.3, 3, T).view(T, 1, 1).double()
    )
    ys = torch.sign(torch.randn(T, 30, generator=g, dtype=torch.float64))
    theta = {"w": torch.zeros(d, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}

    def one(x, y):
        L = lambda p: torch.nn.functional.softplus(-y * (x @ p["w"] + p["b"])).mean()
        steps = 60 if solver in ("newton_cg", "lbfgs") else 400
        phi, info = adapt(
            L,
            theta,
            lam=0.3,
            inner_steps=steps,
            inner_lr=LR[solver],
            solver=solver,
            tol=1e-6,
            options=OPTS.get(solver),
            return_info=True,
        )
        return phi, info["iterations"]

    phis, its = torch.func.vmap(one)(xs, ys)
    for t in range(T):
        phi, it = one(xs[t], ys[t])
        assert int(its[t]) == int(it)
        assert rel({k: phis[k][t] for k in phi}, phi) < 1e-10
    assert len(set(its.tolist())) > 1 or solver == "newton_cg"  # tasks stopped at different steps
    assert int(its.max()) < (60 if solver in ("newton_cg", "lbfgs") else 400)


# -- learned λ --------------------------------------------------------------------


def two_block_problem(seed=0):
    """Linear regression with two parameter tensors, closed-form inner solution for any Λ."""
    g = torch.Generator().manual_seed(seed)
    d1, d2 = 3, 4
    xs = torch.randn(15, d1 + d2, generator=g, dtype=torch.float64)
    ys = torch.randn(15, generator=g, dtype=torch.float64)
    xq = torch.randn(12, d1 + d2, generator=g, dtype=torch.float64)
    yq = torch.randn(12, generator=g, dtype=torch.float64)
    cat = lambda p: torch.cat([p["a"], p["b"]])
    support = lambda p: 0.5 * ((xs @ cat(p) - ys) ** 2).mean()
    query = lambda p: 0.5 * ((xq @ cat(p) - yq) ** 2).mean()
    theta = {
        "a": torch.randn(d1, generator=g, dtype=torch.float64),
        "b": torch.randn(d2, generator=g, dtype=torch.float64),
    }
    A = xs.T @ xs / 15
    c = xs.T @ ys / 15

    def outer_loss(th, lam_a, lam_b):
        Lam = torch.diag(torch.cat([lam_a.expand(d1), lam_b.expand(d2)]))
        phi = torch.linalg.solve(A + Lam, c + Lam @ cat(th))
        return query({"a": phi[:d1], "b": phi[d1:]})

    def phi_star(lam_a, lam_b):
        Lam = torch.diag(torch.cat([lam_a.expand(d1), lam_b.expand(d2)]))
        phi = torch.linalg.solve(A + Lam, c + Lam @ cat(theta))
        return {"a": phi[:d1], "b": phi[d1:]}

    return support, query, theta, outer_loss, phi_star


def fd(f, x, eps=1e-6):
    return (f(x + eps) - f(x - eps)) / (2 * eps)


def test_scalar_lambda_gradient_matches_finite_differences():
    support, query, theta, outer, phi_star = two_block_problem()
    lam = torch.tensor(0.7, dtype=torch.float64)
    phi = phi_star(lam, lam)
    g, _, sg = solve_implicit(support, grad(query)(phi), phi, lam=lam, solver="exact", steps=0)
    analytic = lam_gradient(g, sg, lam)  # d/d log λ
    numeric = fd(lambda loglam: outer(theta, torch.exp(loglam), torch.exp(loglam)), torch.log(lam))
    assert abs(analytic - numeric) < 1e-7 * max(1.0, abs(numeric))
    # and the θ-gradient is the closed form's
    closed = grad(lambda th: outer(th, lam, lam))(theta)
    assert rel(g, closed) < 1e-9


def test_per_tensor_lambda_gradients_match_finite_differences():
    support, query, theta, outer, phi_star = two_block_problem(1)
    la, lb = torch.tensor(0.4, dtype=torch.float64), torch.tensor(2.5, dtype=torch.float64)
    lam = {"a": la, "b": lb}
    phi = phi_star(la, lb)
    for solver, steps in (("exact", 0), ("minres", 7), ("cg", 7)):
        g, _, sg = solve_implicit(
            support, grad(query)(phi), phi, lam=lam, solver=solver, steps=steps
        )
        glog = lam_gradient(g, sg, lam)
        num_a = fd(lambda x: outer(theta, torch.exp(x), lb), torch.log(la))
        num_b = fd(lambda x: outer(theta, la, torch.exp(x)), torch.log(lb))
        assert abs(glog["a"] - num_a) < 1e-7 and abs(glog["b"] - num_b) < 1e-7, solver
        closed = grad(lambda th: outer(th, la, lb))(theta)
        assert rel(g, closed) < 1e-8, solver


def test_equal_per_tensor_lambdas_give_the_scalar_meta_gradient():
    support, query, theta, outer, phi_star = two_block_problem(2)
    lam = torch.tensor(1.3, dtype=torch.float64)
    phi = phi_star(lam, lam)
    v = grad(query)(phi)
    g1, _, _ = solve_implicit(support, v, phi, lam=lam, solver="minres", steps=7)
    g2, _, _ = solve_implicit(support, v, phi, lam={"a": lam, "b": lam}, solver="minres", steps=7)
    assert rel(g2, g1) < 1e-10


@pytest.mark.parametrize("mode", ["scalar", "per_tensor"])
def test_learned_lambda_in_the_algorithm(mode):
    from imaml.data.sinusoid import SinusoidTasks

    fam = SinusoidTasks(k_shot=5, k_query=5)
    gen = torch.Generator().manual_seed(0)
    model = fam.make_model(gen).double()
    alg = make_algorithm(
        "imaml", model=model, loss="mse", lam=1.5, inner_steps=3, inner_lr=0.01, learn_lam=mode
    )
    params = alg.meta_parameters({k: v.detach() for k, v in model.named_parameters()})
    lam_keys = [k for k in params if k.startswith("log_lam")]
    assert len(lam_keys) == (1 if mode == "scalar" else 6)
    assert all(abs(params[k].item() - torch.log(torch.tensor(1.5)).item()) < 1e-7 for k in lam_keys)
    batch = fam.sample(3, generator=gen, dtype=torch.float64)
    g, stats = alg.meta_grad(params, batch)
    assert set(g) == set(params)
    assert torch.allclose(stats["lam"], torch.full((3,), 1.5, dtype=torch.float64))
    # the batched path equals the per-task loop, λ-gradients included
    alg.batched = False
    g_loop, _ = alg.meta_grad(params, batch)
    assert rel(g, g_loop) < 1e-10


def test_learned_lambda_trains_and_logs(tmp_path):
    from imaml.config import from_preset
    from imaml.train import meta_train

    cfg = from_preset(
        "sinusoid",
        learn_lam="scalar",
        meta_steps=5,
        meta_batch=4,
        val_every=5,
        val_tasks=4,
        test_tasks=4,
        threads=1,
        outer_lr=0.05,
    )
    meta_train(cfg, tmp_path / "r", progress=False)
    import json

    lams = [
        json.loads(x).get("lam")
        for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    ]
    lams = [x for x in lams if x is not None]
    assert len(lams) == 5 and lams[0] == pytest.approx(2.0) and lams[-1] != pytest.approx(2.0)


def test_bad_solver_settings():
    from imaml.config import ConfigError, from_preset

    with pytest.raises(ValueError, match="learn_lam"):
        make_algorithm("imaml", model=torch.nn.Linear(2, 1), learn_lam="yes")
    with pytest.raises(ValueError, match="cg_damping"):
        make_algorithm("imaml", model=torch.nn.Linear(2, 1), learn_lam="scalar", cg_damping=1.0)
    with pytest.raises(ConfigError, match="learn_lam"):
        from_preset("omniglot-5w1s", algo="maml", learn_lam="scalar")
    with pytest.raises(ConfigError, match="inner_tol"):
        from_preset("omniglot-5w1s", inner_tol=-1.0)
    assert from_preset("omniglot-5w1s-hf").inner_solver == "newton_cg"
