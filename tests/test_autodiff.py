import pytest
import torch
from torch.func import functional_call

from imaml.autodiff import hvp, linearize_grad
from imaml.models import MLP, OmniglotConvNet, cross_entropy
from imaml.params import ravel

from conftest import rel


def dense_hessian(f, params):
    flat, unravel = ravel(params)
    return torch.autograd.functional.hessian(lambda v: f(unravel(v)), flat)


def mlp_problem():
    g = torch.Generator().manual_seed(0)
    model = MLP((3, 6, 1), generator=g).double()
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(7, 1, generator=g, dtype=torch.float64)
    f = lambda p: ((functional_call(model, p, (x,)) - y) ** 2).mean()
    return f, {k: v.detach() for k, v in model.named_parameters()}


def conv_problem():
    g = torch.Generator().manual_seed(1)
    model = OmniglotConvNet(3, channels=2, generator=g).double()
    x = torch.rand(6, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    f = lambda p: cross_entropy(functional_call(model, p, (x,)), y)[0]
    return f, {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.parametrize("problem", [mlp_problem, conv_problem])
@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_hvp_matches_dense_hessian(problem, mode):
    f, p = problem()
    H = dense_hessian(f, p)
    v = {k: torch.randn_like(t) for k, t in p.items()}
    Hv = hvp(f, p, v, mode=mode)
    assert rel(ravel(Hv)[0], H @ ravel(v)[0]) < 1e-9


def test_dense_reference_agrees_with_finite_differences():
    """The reference itself is checked once (docs/notebook/prototypes.md: torch.func.hessian is 1.8% off here)."""
    f, p = conv_problem()
    flat, unravel = ravel(p)
    H = dense_hessian(f, p)
    v = torch.randn_like(flat)
    eps = 1e-5
    gf = lambda x: ravel(torch.func.grad(f)(unravel(x)))[0]
    fd = (gf(flat + eps * v) - gf(flat - eps * v)) / (2 * eps)
    assert rel(H @ v, fd) < 1e-6


def test_linearize_returns_gradient_and_reusable_hvp():
    f, p = mlp_problem()
    g, H = linearize_grad(f, p)
    assert rel(g, torch.func.grad(f)(p)) < 1e-12
    v1 = {k: torch.randn_like(t) for k, t in p.items()}
    v2 = {k: torch.randn_like(t) for k, t in p.items()}
    both = H({k: v1[k] + 2 * v2[k] for k in p})
    parts = {k: H(v1)[k] + 2 * H(v2)[k] for k in p}  # linear, and callable many times
    assert rel(both, parts) < 1e-12


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_linearize_with_value_gives_the_function_value_too(mode):
    """The value comes from the linearisation's own forward pass (the solve piece's
    support loss); the gradient and products are unchanged."""
    f, p = conv_problem()
    g0, H0 = linearize_grad(f, p, mode=mode)
    g, H, value = linearize_grad(f, p, mode=mode, with_value=True)
    assert value.shape == () and torch.equal(value, f(p))
    v = {k: torch.randn_like(t) for k, t in p.items()}
    assert rel(g, g0) == 0 and rel(H(v), H0(v)) < 1e-14


def test_hvp_under_vmap_matches_loop():
    f, p = mlp_problem()
    vs = {k: torch.randn(4, *t.shape, dtype=t.dtype) for k, t in p.items()}
    batched = torch.func.vmap(lambda v: hvp(f, p, v), in_dims=({k: 0 for k in p},))(vs)
    for i in range(4):
        single = hvp(f, p, {k: vs[k][i] for k in p})
        assert rel({k: batched[k][i] for k in p}, single) < 1e-12


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_hvp_vmapped_over_tasks_matches_each_task(mode):
    """What the batched path does: each task its own φ, support set and vector, through
    batch normalisation whose input depends on φ. The product is taken inside vmap; taken
    by torch.autograd over ``vmap(grad(f))`` instead, PyTorch 2.13 gets the products'
    convolution and batch-norm parts wrong here (8-208% in float64; the head's are exact),
    which is why the pieces never linearise that way (``imaml.fast.make_pieces``)."""
    g = torch.Generator().manual_seed(2)
    model = OmniglotConvNet(3, channels=2, generator=g).double()
    T = 3
    xs = torch.rand(T, 6, 1, 28, 28, generator=g, dtype=torch.float64)
    ys = torch.tensor([0, 1, 2, 0, 1, 2]).expand(T, 6)
    ps = {
        k: v.detach() + 0.1 * torch.randn(T, *v.shape, generator=g, dtype=torch.float64)
        for k, v in model.named_parameters()
    }
    vs = {k: torch.randn(t.shape, generator=g, dtype=torch.float64) for k, t in ps.items()}

    def task_hvp(p, x, y, v):
        f = lambda q: cross_entropy(functional_call(model, q, (x,)), y)[0]
        return hvp(f, p, v, mode=mode)

    batched = torch.func.vmap(task_hvp)(ps, xs, ys, vs)
    for t in range(T):
        single = task_hvp({k: ps[k][t] for k in ps}, xs[t], ys[t], {k: vs[k][t] for k in vs})
        assert rel({k: batched[k][t] for k in ps}, single) < 1e-12


def test_unknown_mode_raises():
    f, p = mlp_problem()
    with pytest.raises(ValueError, match="HVP mode"):
        hvp(f, p, p, mode="sideways")
