import pytest
import torch
from torch.func import grad

from imaml import ALGORITHMS, TaskBatch, adapt, make_algorithm
from imaml.data.linear import LinearRegressionTasks, exact_meta_grad
from imaml.data.sinusoid import SinusoidTasks

from conftest import conv_setup, rel


def sinusoid_setup(T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    fam = SinusoidTasks(k_shot=5, k_query=5)
    model = fam.make_model(g).double()
    batch = fam.sample(T, generator=g, dtype=torch.float64)
    return model, {k: v.detach() for k, v in model.named_parameters()}, batch


def test_maml_matches_central_finite_differences():
    model, theta, batch = sinusoid_setup(T=2)
    alg = make_algorithm("maml", model=model, loss="mse", inner_steps=3, inner_lr=0.02)
    g, _ = alg.meta_grad(theta, batch)

    def meta_loss(th):
        return (
            sum(
                alg.loss_of(t.query_x, t.query_y)(alg.adapt(th, t.support_x, t.support_y))
                for t in (batch.task(i) for i in range(2))
            )
            / 2
        )

    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        d = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in theta.items()}
        eps = 1e-6
        plus = meta_loss({k: theta[k] + eps * d[k] for k in theta})
        minus = meta_loss({k: theta[k] - eps * d[k] for k in theta})
        fd = (plus - minus) / (2 * eps)
        analytic = sum((g[k] * d[k]).sum() for k in theta)
        assert abs(fd - analytic) < 1e-7 * max(1.0, abs(fd))


def test_fomaml_is_query_gradient_at_phi():
    model, theta, batch = sinusoid_setup()
    alg = make_algorithm("fomaml", model=model, loss="mse", inner_steps=4, inner_lr=0.01)
    g, _ = alg.meta_grad(theta, batch)
    ref = {k: 0 for k in theta}
    for i in range(batch.num_tasks):
        t = batch.task(i)
        phi = adapt(
            alg.loss_of(t.support_x, t.support_y), theta, lam=0.0, inner_steps=4, inner_lr=0.01
        )
        gi = grad(alg.loss_of(t.query_x, t.query_y))(phi)
        ref = {k: ref[k] + gi[k] / batch.num_tasks for k in theta}
    assert rel(g, ref) < 1e-12


def test_reptile_is_theta_minus_phi():
    model, theta, batch = sinusoid_setup()
    alg = make_algorithm("reptile", model=model, loss="mse", inner_steps=4, inner_lr=0.01)
    g, _ = alg.meta_grad(theta, batch)
    phis = [alg.adapt(theta, *batch.task(i)[:2]) for i in range(batch.num_tasks)]
    ref = {k: sum(theta[k] - p[k] for p in phis) / len(phis) for k in theta}
    assert rel(g, ref) < 1e-12


def test_imaml_tends_to_fomaml_with_the_same_inner_loop_as_lambda_grows():
    model, theta, batch = sinusoid_setup()
    errs = []
    for lam in (1.0, 1e3, 1e6):
        # a stable inner step for every λ: α·λ ≤ 0.5
        kw = dict(model=model, loss="mse", inner_steps=3, inner_lr=min(0.01, 0.5 / lam), lam=lam)
        gi, _ = make_algorithm("imaml", solver="cg", cg_steps=20, **kw).meta_grad(theta, batch)
        gf, _ = make_algorithm("fomaml", **kw).meta_grad(theta, batch)
        errs.append(rel(gi, gf))
    # the gap is ‖(I + H/λ)⁻¹v − v‖ = O(‖H‖/λ): 1000× more λ, ~1000× closer
    assert errs[0] > 1e-3 and errs[-1] < 1e-3 and errs[2] < 2e-3 * errs[1]


@pytest.mark.parametrize("solver", ["cg", "minres"])
def test_imaml_with_converged_inner_loop_equals_exact_meta_gradient(solver):
    fam = LinearRegressionTasks(dim=8, n_support=16, n_query=12, condition_number=20.0)
    batch = fam.sample(4, generator=torch.Generator().manual_seed(0))
    model = fam.make_model().double()
    theta = {
        "w": torch.randn(8, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    }
    lam = 1.0
    alg = make_algorithm(
        "imaml",
        model=model,
        loss="half_sse",
        lam=lam,
        inner_steps=600,
        inner_lr=1.0 / (1.0 + lam),
        solver=solver,
        cg_steps=8,
    )
    g, stats = alg.meta_grad(theta, batch)
    ref = sum(exact_meta_grad(theta["w"], batch.task(i), lam=lam) for i in range(4)) / 4
    assert rel(g["w"], ref) < 1e-9
    assert stats["inner_grad_norm"].max() < 1e-10 and stats["solver_residual"].max() < 1e-9


def figure_2a_errors(k, lam=0.5):
    fam = LinearRegressionTasks(dim=10, n_support=20, n_query=20, condition_number=100.0)
    batch = fam.sample(8, generator=torch.Generator().manual_seed(0))
    model = fam.make_model().double()
    theta = {"w": torch.zeros(10, 1, dtype=torch.float64)}
    ref = sum(exact_meta_grad(theta["w"], batch.task(i), lam=lam) for i in range(8)) / 8
    kw = dict(model=model, loss="half_sse", lam=lam, inner_steps=k, inner_lr=1.0 / (1.0 + lam))
    out = {}
    for name, extra in [("imaml", {"cg_steps": 10, "solver": "cg"}), ("maml", {}), ("fomaml", {})]:
        out[name] = rel(make_algorithm(name, **kw, **extra).meta_grad(theta, batch)[0]["w"], ref)
    return out


def test_figure_2a_imaml_beats_maml_and_fomaml_stays_wrong():
    errs = {k: figure_2a_errors(k) for k in (2, 5, 10, 40)}
    for k in (2, 5, 10, 40):
        assert errs[k]["imaml"] < errs[k]["maml"]
    assert errs[40]["imaml"] < 1e-3 and errs[40]["maml"] < 1e-2
    assert errs[2]["maml"] > errs[10]["maml"] > errs[40]["maml"]
    fo = [errs[k]["fomaml"] for k in (10, 40)]
    assert fo[1] > 0.1 and abs(fo[0] - fo[1]) < 0.1 * fo[1]  # a constant, non-vanishing error


ALG_KW = {
    "imaml": {"lam": 2.0, "cg_steps": 5},
    "imaml-cg": {"lam": 2.0, "cg_steps": 5, "solver": "cg"},
    "maml": {},
    "fomaml": {},
    "reptile": {},
}


@pytest.mark.parametrize("name", list(ALG_KW))
def test_vmap_path_equals_per_task_loop_float64(name):
    model, theta, batch = conv_setup(torch.float64)
    algo = name.split("-")[0]
    out = {}
    for batched in (True, False):
        alg = make_algorithm(algo, model=model, inner_steps=5, batched=batched, **ALG_KW[name])
        out[batched] = alg.meta_grad(theta, batch)
    assert rel(out[True][0], out[False][0]) < 1e-10
    for k, v in out[False][1].items():
        assert torch.allclose(out[True][1][k].double(), v.double(), rtol=1e-10, atol=1e-12), k


@pytest.mark.parametrize("name", ["imaml", "maml"])
def test_vmap_path_equals_per_task_loop_float32(name):
    model, theta, batch = conv_setup(torch.float32)
    out = [
        make_algorithm(name, model=model, inner_steps=5, batched=b, **ALG_KW[name]).meta_grad(
            theta, batch
        )[0]
        for b in (True, False)
    ]
    assert rel(out[0], out[1]) < 1e-3


def test_reference_code_variant_is_plain_steps_then_one_proximal_pull():
    model, theta, batch = sinusoid_setup()
    t = batch.task(0)
    alg = make_algorithm(
        "imaml",
        model=model,
        loss="mse",
        lam=2.0,
        inner_steps=3,
        inner_lr=0.05,
        variant="reference_code",
    )
    phi = alg.adapt(theta, t.support_x, t.support_y)
    L = alg.loss_of(t.support_x, t.support_y)
    ref = dict(theta)
    for _ in range(3):
        gr = grad(L)(ref)
        ref = {k: ref[k] - 0.05 * gr[k] for k in ref}
    ref = {k: ref[k] - 0.05 * 2.0 * (ref[k] - theta[k]) for k in ref}
    assert rel(phi, ref) < 1e-14


def test_paper_variant_has_proximal_term_in_every_step():
    model, theta, batch = sinusoid_setup()
    t = batch.task(0)
    L = lambda p: ((torch.func.functional_call(model, p, (t.support_x,)) - t.support_y) ** 2).mean()
    phi = adapt(L, theta, lam=2.0, inner_steps=3, inner_lr=0.05)
    ref = dict(theta)
    for _ in range(3):
        gr = grad(L)(ref)
        ref = {k: ref[k] - 0.05 * (gr[k] + 2.0 * (ref[k] - theta[k])) for k in ref}
    assert rel(phi, ref) < 1e-14


def test_stats_have_one_value_per_task():
    model, theta, batch = conv_setup(torch.float32, T=4)
    _, stats = make_algorithm("imaml", model=model, inner_steps=2).meta_grad(theta, batch)
    for key in (
        "support_loss",
        "query_loss",
        "query_accuracy",
        "inner_grad_norm",
        "solver_residual",
        "solver_iterations",
        "negative_curvature",
    ):
        assert stats[key].shape == (4,), key
    assert ((stats["query_accuracy"] >= 0) & (stats["query_accuracy"] <= 1)).all()


def test_non_finite_task_is_dropped_and_counted():
    model, theta, batch = sinusoid_setup()
    sx = batch.support_x.clone()
    sx[1, 0, 0] = float("nan")
    alg = make_algorithm("imaml", model=model, loss="mse", inner_steps=2)
    g, stats = alg.meta_grad(theta, TaskBatch(sx, *batch[1:]))
    assert stats["skipped"].tolist() == [False, True, False]
    keep = TaskBatch(*(t[[0, 2]] for t in batch))
    ref, _ = alg.meta_grad(theta, keep)
    assert rel(g, ref) < 1e-12


def test_all_tasks_non_finite_raises_value_error():
    model, theta, batch = sinusoid_setup()
    alg = make_algorithm("fomaml", model=model, loss="mse", inner_steps=2)
    bad = TaskBatch(batch.support_x * float("nan"), *batch[1:])
    with pytest.raises(ValueError, match="every task"):
        alg.meta_grad(theta, bad)


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("imaml", {"lam": 0.0}, "lam"),
        ("imaml", {"lam": -2.0}, "lam"),
        ("maml", {"inner_steps": -1}, "inner_steps"),
        ("fomaml", {"inner_lr": 0.0}, "inner_lr"),
        ("imaml", {"cg_steps": -5}, "steps"),
        ("imaml", {"solver": "qr"}, "solver"),
        ("reptile", {"cg_steps": 5}, "does not take"),
        ("sgd", {}, "unknown algorithm"),
        ("imaml", {"loss": "hinge"}, "loss"),
        ("imaml", {"variant": "x"}, "variant"),
        ("imaml", {"inner_solver": "bfgs"}, "inner solver"),
    ],
)
def test_bad_hyperparameters_raise_value_error(name, kwargs, match):
    model, *_ = sinusoid_setup()
    with pytest.raises(ValueError, match=match):
        make_algorithm(name, model=model, **kwargs)


def test_registry_names():
    assert set(ALGORITHMS) == {"imaml", "maml", "fomaml", "reptile"}
    with pytest.raises(ValueError, match="model"):
        make_algorithm("imaml")


def test_threads_with_their_own_network_copies_get_the_single_thread_meta_gradients():
    """What the README advises for threads: one algorithm per thread, each on its own copy
    of the network (``functional_call`` swaps parameters into the module it is given)."""
    import copy
    import threading

    model, theta, batch = conv_setup(torch.float64, T=4)
    halves = [TaskBatch(*(t[:2] for t in batch)), TaskBatch(*(t[2:] for t in batch))]
    make = lambda m: make_algorithm("imaml", model=m, inner_steps=5, **ALG_KW["imaml"])
    expected = [make(model).meta_grad(theta, h)[0] for h in halves]
    algs = [make(copy.deepcopy(model)) for _ in halves]
    worst, errors = [0.0, 0.0], []

    def work(i):
        try:
            for _ in range(10):
                worst[i] = max(worst[i], rel(algs[i].meta_grad(theta, halves[i])[0], expected[i]))
        except Exception as e:  # re-raised below, in the test's thread
            errors.append(e)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    assert max(worst) < 1e-12
