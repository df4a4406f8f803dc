"""The generalised Gauss–Newton curvature G = JᵀH_ℓJ against dense float64 math."""

import pytest
import torch
from torch.func import functional_call, hessian, jacrev

from imaml import implicit_meta_grad, make_algorithm
from imaml.autodiff import SplitLoss, linearize_curvature, linearize_ggn
from imaml.cli import main
from imaml.params import ravel

from conftest import conv_setup, rel


def mlp_problem(seed=0, loss="cross_entropy"):
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4))
    net = net.double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    if loss == "cross_entropy":
        y = torch.randint(0, 4, (7,), generator=g)
        ell = lambda z: torch.nn.functional.cross_entropy(z, y)
    else:
        y = torch.randn(7, 4, generator=g, dtype=torch.float64)
        ell = lambda z: ((z - y) ** 2).mean()
    params = {k: v.detach() for k, v in net.named_parameters()}
    return SplitLoss(lambda p: functional_call(net, p, (x,)), ell), params


def dense_ggn(f: SplitLoss, params):
    flat, unravel = ravel(params)
    J = jacrev(lambda v: f.outputs(unravel(v)))(flat).reshape(-1, flat.numel())
    z = f.outputs(params)
    Hl = hessian(lambda u: f.loss(u.reshape(z.shape)))(z.reshape(-1))
    return J.T @ Hl @ J, flat, unravel


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_ggn_product_equals_dense_matrix(loss):
    f, params = mlp_problem(loss=loss)
    G, flat, unravel = dense_ggn(f, params)
    grad, ggn, value = linearize_ggn(f.outputs, f.loss, params, with_value=True)
    v = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert rel(ravel(ggn(unravel(v)))[0], G @ v) < 1e-12
    # the gradient and value come from the same linearisation
    assert rel(ravel(grad)[0], torch.func.grad(lambda w: f(unravel(w)))(flat)) < 1e-12
    assert abs(value.item() - f(params).item()) < 1e-14
    assert torch.linalg.eigvalsh(G)[0] > -1e-12  # positive semi-definite


def linear_problem(seed):
    """Squared error of a model linear in its parameters, a point and a generator."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(9, 4, generator=g, dtype=torch.float64)
    Y = torch.randn(9, 2, generator=g, dtype=torch.float64)
    f = SplitLoss(lambda p: X @ p["w"], lambda z: 0.5 * ((z - Y) ** 2).sum(-1).mean())
    return f, {"w": torch.randn(4, 2, generator=g, dtype=torch.float64)}, g


def test_ggn_equals_hessian_for_a_linear_model_with_squared_error():
    """For outputs linear in the parameters the loss's curvature is all there is: G = H."""
    f, params, g = linear_problem(1)
    v = {"w": torch.randn(4, 2, generator=g, dtype=torch.float64)}
    Gv = linearize_curvature(f, params, curvature="ggn")[1](v)
    Hv = linearize_curvature(f, params, curvature="hessian")[1](v)
    assert rel(Gv, Hv) < 1e-13


def test_implicit_meta_grad_with_ggn_equals_dense_solve():
    f, phi = mlp_problem(seed=2)
    theta = {k: v + 0.1 for k, v in phi.items()}
    G, flat, unravel = dense_ggn(f, phi)
    t = torch.randn_like(flat)
    query = lambda p: 0.5 * ((ravel(p)[0] - t) ** 2).sum()
    lam = 0.7
    ref = torch.linalg.solve(torch.eye(flat.numel(), dtype=torch.float64) + G / lam, flat - t)
    for solver, steps in (("exact", 0), ("cg", flat.numel())):
        g = implicit_meta_grad(
            f, query, theta, phi, lam=lam, solver=solver, steps=steps, curvature="ggn"
        )
        assert rel(ravel(g)[0], ref) < 1e-8, solver


def test_ggn_needs_a_split_loss_and_a_known_name():
    f, params = mlp_problem()
    with pytest.raises(ValueError, match="SplitLoss"):
        linearize_curvature(lambda p: f(p), params, curvature="ggn")
    with pytest.raises(ValueError, match="unknown curvature"):
        linearize_curvature(f, params, curvature="fisher")
    model, _, _ = conv_setup(torch.float64)
    with pytest.raises(ValueError, match="unknown curvature"):
        make_algorithm("imaml", model=model, curvature="gauss")


def test_imaml_ggn_meta_gradient_on_the_conv_net_equals_dense_solve(f64):
    """The batched algorithm with curvature ggn: each task's g against (I + G/λ)⁻¹∇L(φ)
    with G formed densely (BatchNorm with batch statistics inside the outputs), and no
    negative curvature flagged by CG."""
    model, theta, batch = conv_setup(torch.float64, T=2, channels=2)
    alg = make_algorithm(
        "imaml",
        model=model,
        lam=2.0,
        inner_steps=3,
        solver="cg",
        cg_steps=400,
        curvature="ggn",
    )
    g, stats = alg.meta_grad_tensors(theta, batch)
    assert not bool(stats["negative_curvature"].any())
    refs = []
    for i in range(batch.num_tasks):
        sx, sy, qx, qy = batch.task(i)
        phi = alg.adapt(theta, sx, sy)
        G, flat, unravel = dense_ggn(alg.loss_of(sx, sy), phi)
        v = ravel(torch.func.grad(alg.loss_of(qx, qy))(phi))[0]
        refs.append(torch.linalg.solve(torch.eye(flat.numel(), dtype=torch.float64) + G / 2.0, v))
    assert rel(ravel(g)[0], torch.stack(refs).mean(0)) < 1e-7


def test_cg_on_ggn_never_flags_negative_curvature_where_hessian_does(f64):
    model, theta, batch = conv_setup(torch.float64, T=4, channels=4, seed=3)
    flagged = {}
    for curvature in ("hessian", "ggn"):
        alg = make_algorithm(
            "imaml",
            model=model,
            lam=0.05,
            inner_steps=2,
            solver="cg",
            cg_steps=20,
            curvature=curvature,
        )
        flagged[curvature] = alg.meta_grad_tensors(theta, batch)[1]["negative_curvature"]
    assert not bool(flagged["ggn"].any())
    assert bool(flagged["hessian"].any())  # the same tasks are indefinite with H


@pytest.mark.parametrize(
    "args,name",
    [
        (["--algo", "fomaml", "--solver", "cg"], "--solver"),
        (["--algo", "maml", "--curvature", "ggn"], "--curvature"),
        (["--algo", "reptile", "--cg-damping", "1"], "--cg-damping"),
    ],
)
def test_cli_refuses_implicit_options_for_other_algorithms(args, name, tmp_path, capsys):
    code = main(["train", "--task", "sinusoid", "--meta-steps", "1", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert name in err and "imaml" in err
    assert not (tmp_path / "last.pt").exists()


def test_cli_unknown_curvature_is_one_line(tmp_path, capsys):
    code = main(["train", "--task", "sinusoid", "--curvature", "fisher", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "curvature" in err and err.count("\n") == 0


def test_newton_cg_with_gauss_newton_equals_newton_where_the_model_is_linear():
    """A linear model with squared error: G = H, so both inner solvers take the same steps."""
    from imaml import adapt

    f, theta, _ = linear_problem(4)
    out = {}
    for curvature in ("hessian", "ggn"):
        out[curvature] = adapt(
            f,
            theta,
            lam=0.3,
            inner_steps=2,
            inner_lr=1.0,
            solver="newton_cg",
            options={"cg_steps": 8, "curvature": curvature},
        )
    assert rel(out["ggn"], out["hessian"]) < 1e-12
    # and the Newton step solved the quadratic: ∇G(φ) = 0
    G = lambda p: f(p) + 0.15 * ((p["w"] - theta["w"]) ** 2).sum()
    assert torch.func.grad(G)(out["ggn"])["w"].norm() < 1e-10


def test_newton_cg_with_gauss_newton_descends_on_the_conv_net(f64):
    """Where ∇²G is indefinite, the Gauss–Newton Newton steps still lower G every time."""
    from imaml.inner import proximal_objective
    from imaml.inner_optim import newton_cg

    model, theta, batch = conv_setup(torch.float64, T=1, channels=3, seed=5)
    alg = make_algorithm("imaml", model=model)
    sx, sy, _, _ = batch.task(0)
    G = proximal_objective(alg.loss_of(sx, sy), theta, lam=0.1)
    values, phi = [G(theta).item()], theta
    for _ in range(4):
        phi, _ = newton_cg(G, phi, steps=1, cg_steps=10, curvature="ggn")
        values.append(G(phi).item())
    assert all(b < a for a, b in zip(values, values[1:], strict=False)), values
    with pytest.raises(ValueError, match="SplitLoss"):
        newton_cg(lambda p: G(p), theta, steps=1, curvature="ggn")
