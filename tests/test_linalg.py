import pytest
import torch

from imaml.linalg import cg, dense_matrix, exact, minres, neumann, solve

from conftest import rel


def spd(n, cond, seed):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, torch.log10(torch.tensor(float(cond))).item(), n, dtype=torch.float64)
    return Q @ torch.diag(eig) @ Q.T, torch.randn(n, generator=g, dtype=torch.float64)


def indefinite(n, seed):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.cat(
        [
            -torch.linspace(0.5, 2.0, 3, dtype=torch.float64),
            torch.linspace(0.5, 10.0, n - 3, dtype=torch.float64),
        ]
    )
    return Q @ torch.diag(eig) @ Q.T, torch.randn(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("method", [cg, minres])
def test_krylov_solves_spd_system(method):
    A, b = spd(30, 100, 0)
    x, info = method(lambda v: A @ v, b, steps=60)
    assert rel(x, torch.linalg.solve(A, b)) < 1e-9
    assert info["residual"] < 1e-9
    assert not info["negative_curvature"]


def test_cg_takes_fewer_steps_than_n_with_tol_and_reports_them():
    A, b = spd(30, 10, 1)
    x, info = cg(lambda v: A @ v, b, steps=100, tol=1e-6)
    assert 0 < info["iterations"] < 30
    assert torch.linalg.norm(b - A @ x) / torch.linalg.norm(b) <= 1e-6
    assert abs(info["residual"] - torch.linalg.norm(b - A @ x) / torch.linalg.norm(b)) < 1e-9


def test_minres_solves_indefinite_system_where_cg_stops():
    A, b = indefinite(25, 2)
    ref = torch.linalg.solve(A, b)
    x, info = minres(lambda v: A @ v, b, steps=60)
    assert rel(x, ref) < 1e-8
    assert info["negative_curvature"]
    xc, infoc = cg(lambda v: A @ v, b, steps=60)
    assert infoc["negative_curvature"]
    assert rel(xc, ref) > 1e-2  # truncated: CG does not (and must not pretend to) solve it
    assert torch.isfinite(xc).all()


def test_minres_residual_never_increases_on_indefinite_system():
    A, b = indefinite(25, 3)
    res = [minres(lambda v: A @ v, b, steps=k)[1]["residual"].item() for k in range(1, 26)]
    assert all(r2 <= r1 + 1e-12 for r1, r2 in zip(res, res[1:], strict=False))
    true = torch.linalg.norm(b - A @ minres(lambda v: A @ v, b, steps=7)[0]) / torch.linalg.norm(b)
    assert abs(true - res[6]) < 1e-10  # the recursive residual is the true residual


def test_cg_negative_curvature_at_first_step_returns_b():
    A = -torch.eye(4, dtype=torch.float64)
    b = torch.ones(4, dtype=torch.float64)
    x, info = cg(lambda v: A @ v, b, steps=5)
    assert torch.equal(x, b) and info["negative_curvature"] and info["iterations"] == 0
    assert abs(info["residual"].item() - 2.0) < 1e-12  # ‖b − A·b‖/‖b‖ = 2


def test_neumann_converges_inside_and_diverges_outside_its_radius():
    A, b = spd(20, 10, 4)  # eigenvalues in [1, 10]
    ref = torch.linalg.solve(A, b)
    x, info = neumann(lambda v: A @ v, b, steps=400, alpha=0.15)  # spec(αA) ⊂ [0.15, 1.5]
    assert rel(x, ref) < 1e-10
    x, info = neumann(lambda v: A @ v, b, steps=30, alpha=1.0)  # spec(A) reaches 10 > 2
    assert info["residual"] > 1e3


def test_exact_matches_linalg_solve_and_reports_indefiniteness():
    A, b = indefinite(12, 5)
    x, info = exact(lambda v: A @ v, b)
    assert rel(x, torch.linalg.solve(A, b)) < 1e-12
    assert info["negative_curvature"]
    assert torch.allclose(dense_matrix(lambda v: A @ v, 12, dtype=torch.float64), A)


@pytest.mark.parametrize("method", ["cg", "minres", "neumann", "exact"])
def test_dict_vectors_match_flat_vectors(method):
    A, b = spd(12, 5, 6)
    split = lambda v: {"w": v[:8].reshape(2, 4), "b": v[8:]}
    flat = lambda d: torch.cat([d["w"].reshape(-1), d["b"]])
    x, _ = solve(lambda v: A @ v, b, method=method, steps=12)
    xd, _ = solve(lambda d: split(A @ flat(d)), split(b), method=method, steps=12)
    assert set(xd) == {"w", "b"} and xd["w"].shape == (2, 4)
    assert rel(flat(xd), x) < 1e-12


@pytest.mark.parametrize("method", ["cg", "minres", "neumann", "exact"])
def test_vmap_over_systems_equals_loop(method):
    systems = [spd(10, 20, s) for s in range(3)] + [indefinite(10, 7)]
    As = torch.stack([a for a, _ in systems])
    bs = torch.stack([b for _, b in systems])

    def one(A, b):
        x, info = solve(lambda v: A @ v, b, method=method, steps=6, tol=1e-3)
        return x, info["iterations"], info["residual"], info["negative_curvature"]

    batched = torch.func.vmap(one)(As, bs)
    for i in range(4):
        single = one(As[i], bs[i])
        for a, s in zip(batched, single, strict=True):
            assert torch.allclose(
                a[i].to(torch.float64), s.to(torch.float64), rtol=1e-10, atol=1e-12
            )


def test_zero_rhs_gives_zero():
    A, _ = spd(5, 2, 0)
    for m in ("cg", "minres", "neumann"):
        x, info = solve(lambda v: A @ v, torch.zeros(5, dtype=torch.float64), method=m, steps=5)
        assert torch.equal(x, torch.zeros(5, dtype=torch.float64)) and info["iterations"] == 0


@pytest.mark.parametrize("kwargs", [{"steps": -1}, {"steps": 2.5}, {"steps": 3, "tol": -1.0}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        cg(lambda v: v, torch.ones(3), **kwargs)


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="unknown solver"):
        solve(lambda v: v, torch.ones(3), method="gmres", steps=3)


@pytest.mark.parametrize("method", ["cg", "minres", "neumann"])
@pytest.mark.parametrize("tol", [0.0, 1e-3])
def test_rows_of_a_2d_b_are_solved_as_separate_systems(method, tol):
    """b of shape (T, n) outside vmap: each row is its own system (own step sizes, own
    stopping), as the piecewise meta-step solves them; equal to one solve per row."""
    systems = [spd(10, 20, s) for s in range(3)] + [indefinite(10, 7)]
    As = torch.stack([a for a, _ in systems])
    bs = torch.stack([b for _, b in systems])
    bs[1] = 0.0  # a zero right-hand side is done before the first step
    mv = lambda V: torch.einsum("tij,tj->ti", As, V)
    x, info = solve(mv, bs, method=method, steps=6, tol=tol)
    assert x.shape == bs.shape and info["residual"].shape == (4,)
    iterations = []
    for i in range(4):
        xi, ii = solve(lambda v, A=As[i]: A @ v, bs[i], method=method, steps=6, tol=tol)
        assert torch.allclose(x[i], xi, rtol=1e-10, atol=1e-12)
        for k, v in ii.items():
            assert torch.allclose(info[k][i].double(), v.double(), rtol=1e-10, atol=1e-12), k
        iterations.append(int(ii["iterations"]))
    assert iterations[1] == 0 and len(set(iterations)) > 1  # the rows did stop apart
    if method == "cg":  # the indefinite row met negative curvature, the others did not
        assert info["negative_curvature"].tolist() == [False, False, False, True]


def test_exact_solves_one_system_only():
    A, b = spd(4, 2, 0)
    with pytest.raises(ValueError, match="one system"):
        solve(lambda V: V @ A, torch.stack([b, b]), method="exact", steps=0)
    with pytest.raises(ValueError, match="1-D tensor .* 2-D tensor"):
        solve(lambda v: v, torch.ones(2, 2, 2), method="cg", steps=2)


def test_minres_flags_indefiniteness_that_no_rayleigh_quotient_shows():
    """A = diag(-0.5, 3) with b = (1, 1): the Lanczos vectors' Rayleigh quotients are 1.25
    and 1.25 (both > 0), but T_2 (similar to A) is indefinite: its second LDLᵀ pivot is
    negative. MINRES flags it within n steps; an SPD matrix is never flagged."""
    A = torch.diag(torch.tensor([-0.5, 3.0], dtype=torch.float64))
    b = torch.ones(2, dtype=torch.float64)
    _, info = minres(lambda v: A @ v, b, steps=1)
    assert not info["negative_curvature"]  # one step sees only vᵀAv = 1.25
    x, info = minres(lambda v: A @ v, b, steps=2)
    assert info["negative_curvature"] and rel(x, torch.linalg.solve(A, b)) < 1e-12
    for seed in range(5):
        S, c = spd(12, 100, seed)
        assert not minres(lambda v, S=S: S @ v, c, steps=12)[1]["negative_curvature"]
        M, c = indefinite(12, seed)
        assert minres(lambda v, M=M: M @ v, c, steps=12)[1]["negative_curvature"]
