"""Mini-batched inner steps (``inner_batch``, Nichol et al.'s Reptile): the order of the
support examples, each algorithm's meta-gradient against the inner loop written out by
hand in float64, the batched path against the per-task loop, and the clashes refused."""

import pytest
import torch
import torch.nn.functional as F

from imaml import make_algorithm
from imaml.algorithms import TaskBatch
from imaml.inner import batch_order

N, D, C = 12, 5, 3  # support examples, features, classes


def problem(tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(D, C).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(tasks, N, D, generator=g, dtype=torch.float64)
    y = torch.arange(C).repeat_interleave(N // C).expand(tasks, N).contiguous()  # by class
    qx = torch.randn(tasks, 6, D, generator=g, dtype=torch.float64)
    qy = torch.randint(0, C, (tasks, 6), generator=g)
    return model, TaskBatch(x, y, qx, qy)


def by_hand(theta, x, y, *, solver, steps, lr, batch):
    """The inner loop written out: step t on the cross-entropy of its mini-batch only."""
    w, b = theta["weight"].clone(), theta["bias"].clone()
    m = [torch.zeros_like(w), torch.zeros_like(b)]
    s = [torch.zeros_like(w), torch.zeros_like(b)]
    for t, idx in enumerate(batch_order(N, batch, steps)):
        i = torch.tensor(idx)
        w_, b_ = w.requires_grad_(), b.requires_grad_()
        loss = F.cross_entropy(x[i] @ w_.T + b_, y[i])
        gs = torch.autograd.grad(loss, (w_, b_))
        if solver == "gd":
            w, b = (p.detach() - lr * g for p, g in zip((w, b), gs, strict=True))
        else:  # Adam, β = (0.9, 0.999), ε = 1e-8, bias-corrected
            new = []
            for j, (p, g) in enumerate(zip((w, b), gs, strict=True)):
                m[j] = 0.9 * m[j] + 0.1 * g
                s[j] = 0.999 * s[j] + 0.001 * g**2
                mh, sh = m[j] / (1 - 0.9 ** (t + 1)), s[j] / (1 - 0.999 ** (t + 1))
                new.append(p.detach() - lr * mh / (sh.sqrt() + 1e-8))
            w, b = new
    return {"weight": w, "bias": b}


def test_the_order_is_epochs_of_permutations_cut_into_batches():
    order = batch_order(12, 4, 7)
    assert len(order) == 7 and all(len(b) == 4 for b in order)
    flat = [i for b in order for i in b]
    for e in range(2):  # every example once per epoch of 3 steps
        assert sorted(flat[12 * e : 12 * (e + 1)]) == list(range(12))
    assert flat[:12] != flat[12:24]  # a new order each epoch
    assert order == batch_order(12, 4, 7)  # fixed: no RNG state, so resumes are exact
    # a support set sorted by class still gives mixed batches
    assert any(len({i // 4 for i in b}) > 1 for b in order)


@pytest.mark.parametrize("solver", ["gd", "adam"])
@pytest.mark.parametrize("batched", [True, False])
def test_reptile_and_fomaml_equal_the_loop_written_out(solver, batched):
    model, batch = problem()
    lr, steps, B = (0.3 if solver == "gd" else 0.05), 5, 4
    theta = {k: v.detach() for k, v in model.named_parameters()}
    for algo in ("reptile", "fomaml"):
        alg = make_algorithm(
            algo,
            model=model,
            inner_steps=steps,
            inner_lr=lr,
            inner_solver=solver,
            inner_batch=B,
            batched=batched,
        )
        g, _ = alg.meta_grad(dict(model.named_parameters()), batch)
        want = {k: torch.zeros_like(v) for k, v in theta.items()}
        for t in range(batch.num_tasks):
            phi = by_hand(
                theta,
                batch.support_x[t],
                batch.support_y[t],
                solver=solver,
                steps=steps,
                lr=lr,
                batch=B,
            )
            if algo == "reptile":
                gt = {k: theta[k] - phi[k] for k in theta}
            else:
                w, b = (phi[k].requires_grad_() for k in ("weight", "bias"))
                q = F.cross_entropy(batch.query_x[t] @ w.T + b, batch.query_y[t])
                gt = dict(zip(("weight", "bias"), torch.autograd.grad(q, (w, b)), strict=True))
            for k in want:
                want[k] += gt[k] / batch.num_tasks
        for k in want:
            torch.testing.assert_close(g[k], want[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("algo", ["imaml", "maml"])
def test_the_batched_path_equals_the_per_task_loop(algo):
    """iMAML and MAML with mini-batches: vmap over tasks gives the per-task loop's numbers
    (and MAML differentiates through the mini-batches as through full batches)."""
    model, batch = problem()
    kw = dict(model=model, inner_steps=4, inner_lr=0.2, inner_batch=5)
    if algo == "imaml":
        kw.update(lam=1.0, solver="exact")
    a, _ = make_algorithm(algo, batched=True, **kw).meta_grad(dict(model.named_parameters()), batch)
    b, _ = make_algorithm(algo, batched=False, **kw).meta_grad(
        dict(model.named_parameters()), batch
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-11, atol=1e-12)
    full, _ = make_algorithm(algo, **{**kw, "inner_batch": None}).meta_grad(
        dict(model.named_parameters()), batch
    )
    assert not torch.allclose(a["weight"], full["weight"])  # the batches made a difference


def test_a_batch_as_large_as_the_support_set_is_the_full_batch():
    model, batch = problem()
    params = dict(model.named_parameters())
    kw = dict(model=model, inner_steps=3, inner_lr=0.2)
    full, _ = make_algorithm("reptile", **kw).meta_grad(params, batch)
    for B in (N, N + 5):
        g, _ = make_algorithm("reptile", inner_batch=B, **kw).meta_grad(params, batch)
        assert all(torch.equal(g[k], full[k]) for k in g)


def test_evaluation_overrides_the_batch():
    model, batch = problem(tasks=1)
    alg = make_algorithm("reptile", model=model, inner_steps=3, inner_lr=0.2, inner_batch=4)
    theta = dict(model.named_parameters())
    sx, sy = batch.support_x[0], batch.support_y[0]
    plain = make_algorithm("reptile", model=model, inner_steps=3, inner_lr=0.2)
    a, b = alg.adapt(theta, sx, sy, inner_batch=N), plain.adapt(theta, sx, sy)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = alg.adapt(theta, sx, sy)
    assert not torch.equal(c["weight"], b["weight"])


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        (dict(inner_batch=0), "inner_batch"),
        (dict(inner_batch=2.5), "inner_batch"),
        (dict(inner_batch=4, inner_solver="lbfgs"), "first-order inner solver"),
        (dict(inner_batch=4, inner_solver="newton_cg"), "first-order inner solver"),
        (dict(inner_batch=4, inner_tol=1e-3), "inner_tol"),
    ],
)
def test_clashes_are_refused_in_one_line(kw, words):
    model, _ = problem()
    with pytest.raises(ValueError, match=words) as e:
        make_algorithm("reptile", model=model, **kw)
    assert "\n" not in str(e.value)


def test_the_compiled_pieces_leave_mini_batches_to_the_plain_step():
    from imaml.fast.pieces import piecewise_unsupported

    model, _ = problem()
    alg = make_algorithm("imaml", model=model, inner_batch=4)
    assert "inner_batch" in piecewise_unsupported(alg, algo="imaml")


@pytest.mark.parametrize("algo", ["reptile", "fomaml", "maml"])
def test_the_full_support_gradient_norm_is_left_out_with_mini_batches(algo):
    """‖∇G(φ)‖ on the whole support set would cost more than the mini-batched steps: it
    is reported without ``inner_batch`` only (training logs what the stats hold)."""
    model, batch = problem()
    params = dict(model.named_parameters())
    kw = dict(model=model, inner_steps=3, inner_lr=0.2)
    _, full = make_algorithm(algo, **kw).meta_grad(params, batch)
    _, mini = make_algorithm(algo, inner_batch=4, **kw).meta_grad(params, batch)
    assert "inner_grad_norm" in full and "inner_grad_norm" not in mini
    assert set(full) - set(mini) == {"inner_grad_norm"}
