import pytest
import torch

from imaml import implicit_meta_grad
from imaml.algorithms import TaskBatch
from imaml.data.linear import LinearRegressionTasks, inner_solution
from imaml.params import ravel

from conftest import rel


def quadratic(seed=0):
    """L̂(φ) = ½φᵀQφ − cᵀφ over a two-tensor dict, so H = Q exactly; L(φ) = ½‖φ − t‖²."""
    g = torch.Generator().manual_seed(seed)
    n = 9
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    Q = B @ B.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
    c = torch.randn(n, generator=g, dtype=torch.float64)
    t = torch.randn(n, generator=g, dtype=torch.float64)
    flat = lambda p: torch.cat([p["w"].reshape(-1), p["b"]])
    support = lambda p: 0.5 * flat(p) @ Q @ flat(p) - c @ flat(p)
    query = lambda p: 0.5 * ((flat(p) - t) ** 2).sum()
    phi = {
        "w": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "b": torch.randn(3, generator=g, dtype=torch.float64),
    }
    theta = {k: torch.randn_like(v) for k, v in phi.items()}
    return support, query, theta, phi, Q, flat(phi) - t, flat


@pytest.mark.parametrize("solver,steps", [("exact", 0), ("cg", 9), ("minres", 9)])
@pytest.mark.parametrize("lam", [0.3, 2.0])
def test_closed_form_on_quadratic(solver, steps, lam):
    support, query, theta, phi, Q, v, flat = quadratic()
    g = implicit_meta_grad(support, query, theta, phi, lam=lam, solver=solver, steps=steps)
    ref = torch.linalg.solve(torch.eye(9, dtype=torch.float64) + Q / lam, v)
    assert set(g) == {"w", "b"} and g["w"].shape == (2, 3)
    assert rel(flat(g), ref) < 1e-9


def test_neumann_converges_to_closed_form_when_spectrum_allows():
    support, query, theta, phi, Q, v, flat = quadratic()
    lam = 20.0 * torch.linalg.eigvalsh(Q)[-1].item()  # ‖H/λ‖ = 0.05 < 1
    g = implicit_meta_grad(support, query, theta, phi, lam=lam, solver="neumann", steps=30)
    assert rel(flat(g), torch.linalg.solve(torch.eye(9, dtype=torch.float64) + Q / lam, v)) < 1e-12


def test_damping_reproduces_released_code_operator():
    support, query, theta, phi, Q, v, flat = quadratic(1)
    g = implicit_meta_grad(
        support, query, theta, phi, lam=2.0, solver="exact", cg_damping=1.0, lam_damping=10.0
    )
    ref = torch.linalg.solve(2.0 * torch.eye(9, dtype=torch.float64) + Q / 12.0, v)
    assert rel(flat(g), ref) < 1e-10


def test_large_lambda_tends_to_first_order_gradient():
    support, query, theta, phi, Q, v, flat = quadratic(2)
    errs = [
        rel(flat(implicit_meta_grad(support, query, theta, phi, lam=lam, solver="exact")), v)
        for lam in (1.0, 1e2, 1e4, 1e6)
    ]
    assert errs[0] > 0.05 and errs[-1] < 1e-5
    assert all(b < a for a, b in zip(errs, errs[1:], strict=False))


@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_end_to_end_equals_derivative_of_closed_form_solve(lam):
    """After a converged inner loop, g equals d/dθ L(φ*(θ)) with φ* from a differentiable solve."""
    fam = LinearRegressionTasks(dim=6, n_support=12, n_query=10, condition_number=30.0)
    task = fam.sample(1, generator=torch.Generator().manual_seed(3)).task(0)
    xs, ys, xq, yq = task
    support = lambda p: 0.5 * ((xs @ p["w"] - ys) ** 2).sum(-1).mean()
    query = lambda p: 0.5 * ((xq @ p["w"] - yq) ** 2).sum(-1).mean()
    theta = {
        "w": torch.randn(6, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    }
    # inner loop: GD on G until ‖∇G‖ < 1e-12 (step 1/(L+λ), L ≤ 1 by construction)
    G = lambda p: support(p) + 0.5 * lam * ((p["w"] - theta["w"]) ** 2).sum()
    phi = dict(theta)
    for _ in range(5000):
        phi = {"w": phi["w"] - torch.func.grad(G)(phi)["w"] / (1.0 + lam)}
    assert torch.func.grad(G)(phi)["w"].norm() < 1e-12
    g = implicit_meta_grad(support, query, theta, phi, lam=lam, solver="cg", steps=6)
    closed = torch.func.grad(lambda th: query({"w": inner_solution(th, xs, ys, lam=lam)}))(
        theta["w"]
    )
    assert rel(g["w"], closed) < 1e-9


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lam": 0.0}, "lam"),
        ({"lam": -1.0}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"lam": 2.0, "steps": -3}, "steps"),
        ({"lam": 2.0, "solver": "lu"}, "solver"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    support, query, theta, phi, *_ = quadratic()
    with pytest.raises(ValueError, match=match):
        implicit_meta_grad(support, query, theta, phi, **kwargs)


def test_mismatched_theta_phi_raise():
    support, query, theta, phi, *_ = quadratic()
    with pytest.raises(ValueError, match="same keys"):
        implicit_meta_grad(support, query, {"w": theta["w"]}, phi, lam=1.0)
    with pytest.raises(ValueError, match="shape"):
        implicit_meta_grad(support, query, {"w": theta["w"], "b": torch.zeros(4)}, phi, lam=1.0)


def test_nan_loss_raises():
    support, query, theta, phi, *_ = quadratic()
    bad = {k: v.clone() for k, v in phi.items()}
    bad["b"][0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        implicit_meta_grad(support, query, theta, bad, lam=1.0)


def test_runs_under_vmap_over_tasks():
    support, query, theta, phi, Q, v, flat = quadratic()
    shifts = torch.linspace(0, 1, 3, dtype=torch.float64)
    f = lambda s: ravel(
        implicit_meta_grad(
            support, lambda p: query(p) * (1 + s), theta, phi, lam=2.0, solver="cg", steps=9
        )
    )[0]
    out = torch.func.vmap(f)(shifts)
    ref = torch.linalg.solve(torch.eye(9, dtype=torch.float64) + Q / 2.0, v)
    for i, s in enumerate(shifts):
        assert rel(out[i], ref * (1 + s)) < 1e-9


def test_taskbatch_helpers():
    b = TaskBatch(*(torch.zeros(3, 2) for _ in range(4)))
    assert b.num_tasks == 3 and b.task(1).support_x.shape == (2,)
