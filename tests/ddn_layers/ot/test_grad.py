"""Gradients of ddn.sinkhorn: float64 gradcheck of every exact mode, and the modes agree."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

import ddn_layers as ddn
from ddn_layers.ot import backward as bw
from ddn_layers.ot import schur
from tests.ddn_layers.ot.helpers import TIGHT, pad, problem
from tests.ddn_layers.testing import ALL_MODES, EXACT_MODES, F64

CASES = [
    # (B, m, n, gamma, scale of M, uniform marginals, padded)
    # scale keeps gamma * M within ~10, so that every perturbed solve of gradcheck is fast; the
    # large-gamma regime is covered by the stability tests. TestOptimalTransport (test_layer.py)
    # checks (3, 5, 3, 10.0, 1.0, False, False).
    (1, 4, 6, 1.0, 1.0, False, False),
    (3, 4, 4, 100.0, 0.1, False, True),
    (1, 5, 3, 10.0, 1.0, True, False),
    (3, 3, 5, 10.0, 1.0, False, True),
    (1, 6, 4, 100.0, 0.1, False, True),
]


@pytest.mark.parametrize("mode", EXACT_MODES, ids=str)
@pytest.mark.parametrize("B,m,n,gamma,scale,uniform,padded", CASES)
def test_gradcheck_float64(mode, B, m, n, gamma, scale, uniform, padded):
    M, r, c = problem(B, m, n, uniform=uniform, scale=scale, seed=m * n + B)
    M.requires_grad_()
    inputs = [M]
    if not uniform:
        r.requires_grad_()
        c.requires_grad_()
        inputs += [r, c]

    def fn(M, r=None, c=None):
        if padded:
            # padding is structural: only the real entries are perturbed
            M, r, c = pad(M, r, c, 2, 1)
        return ddn.sinkhorn(M, r, c, gamma=gamma, backward_mode=mode, **TIGHT)

    assert gradcheck(fn, tuple(inputs), fast_mode=False, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
@pytest.mark.parametrize("shape", [(2, 6, 8), (2, 8, 6)])
def test_gradcheck_each_implicit_solver(solver, shape):
    """Six real entries on the smaller side: the smallest system CG is trusted with."""
    M, r, c = problem(*shape, seed=3)
    for t in (M, r, c):
        t.requires_grad_()

    def fn(M, r, c):
        M, r, c = pad(M, r, c, 1, 2)
        return ddn.sinkhorn(M, r, c, gamma=10.0, implicit_solver=solver, **TIGHT)

    assert gradcheck(fn, (M, r, c), fast_mode=False, atol=1e-7, rtol=1e-4)


def _grads(mode, M, r, c, W, **kw):
    M, r, c = (t.detach().clone().requires_grad_() for t in (M, r, c))
    P = ddn.sinkhorn(M, r, c, backward_mode=mode, **kw)
    (P * W).sum().backward()
    return P.detach(), M.grad, r.grad, c.grad


@pytest.mark.parametrize("shape", [(2, 30, 20), (2, 20, 30), (1, 40, 40)])
@pytest.mark.parametrize("gamma", [1.0, 30.0])
def test_modes_agree(shape, gamma):
    M, r, c = problem(*shape, seed=11)
    W = torch.randn(shape, dtype=M.dtype)
    ref = _grads("full", M, r, c, W, gamma=gamma, **TIGHT)
    for mode, solver in [("implicit", "cholesky"), ("implicit", "cg"), ("unroll", "auto")]:
        got = _grads(mode, M, r, c, W, gamma=gamma, implicit_solver=solver, **TIGHT)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_padding_gets_zero_gradient_and_matches_unpadded():
    M, r, c = problem(2, 5, 4, seed=5)
    W = torch.randn(2, 5, 4, dtype=M.dtype)
    Mp, rp, cp = pad(M, r, c, 3, 2)
    Wp = torch.randn(Mp.shape, dtype=M.dtype)
    Wp[:, :5, :4] = W
    for mode in ALL_MODES:
        P, gM, gr, gc = _grads(mode, M, r, c, W, gamma=10.0, **TIGHT)
        Pp, gMp, grp, gcp = _grads(mode, Mp, rp, cp, Wp, gamma=10.0, **TIGHT)
        assert torch.all(Pp[:, 5:] == 0) and torch.all(Pp[:, :, 4:] == 0)
        assert torch.all(gMp[:, 5:] == 0) and torch.all(gMp[:, :, 4:] == 0)
        assert torch.all(grp[:, 5:] == 0) and torch.all(gcp[:, 4:] == 0)
        torch.testing.assert_close(Pp[:, :5, :4], P, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gMp[:, :5, :4], gM, rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(grp[:, :5], gr, rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(gcp[:, :4], gc, rtol=1e-6, atol=1e-10)


def test_scaling_marginals_changes_nothing():
    """r and c are normalised inside: their gradient is orthogonal to their own direction."""
    M, r, c = problem(2, 6, 5, seed=9)
    W = torch.randn(2, 6, 5, dtype=M.dtype)
    P1, _, gr, gc = _grads("implicit", M, r, c, W, gamma=5.0, **TIGHT)
    P2 = ddn.sinkhorn(M, 3 * r, 0.5 * c, gamma=5.0, **TIGHT)
    torch.testing.assert_close(P1, P2)
    torch.testing.assert_close((gr * r).sum(-1), torch.zeros(2, dtype=M.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close((gc * c).sum(-1), torch.zeros(2, dtype=M.dtype), atol=1e-12, rtol=0)


def test_approx_is_close_when_few_iterations_are_needed():
    # gamma small: P is close to r c^T and Sinkhorn converges in a few iterations
    # The neglected term gamma P o (a (+) b) is the P-weighted row/column-mean part of
    # gamma P o V: with m n entries and m + n constraints it is a small part of the gradient.
    M, r, c = problem(2, 40, 30, seed=2)
    W = torch.randn(2, 40, 30, dtype=M.dtype)
    _, gM_exact, _, _ = _grads("implicit", M, r, c, W, gamma=0.05, **TIGHT)
    _, gM_approx, gr, gc = _grads("approx", M, r, c, W, gamma=0.05, **TIGHT)
    assert torch.isfinite(gM_approx).all() and torch.isfinite(gr).all() and torch.isfinite(gc).all()
    rel = (gM_approx - gM_exact).norm() / gM_exact.norm()
    assert rel < 0.35
    cos = torch.nn.functional.cosine_similarity(gM_approx.flatten(), gM_exact.flatten(), dim=0)
    assert cos > 0.93


def test_approx_is_the_gradient_with_the_scalings_held_fixed():
    """What ``approx`` computes (DESIGN.md: constraints ignored): the derivative of
    P = diag(r_hat o u) exp(-gamma M) diag(c_hat o v) with Sinkhorn's scalings u, v held
    constant, for M and for r, c alike (r_hat, c_hat the normalised marginals)."""
    gamma = 3.0
    M, r, c = problem(2, 6, 5, seed=4)
    W = torch.randn(2, 6, 5, dtype=M.dtype, generator=torch.Generator().manual_seed(1))
    P, gM, gr, gc = _grads("approx", M, r, c, W, gamma=gamma, **TIGHT)
    Mv, rv, cv = (t.detach().clone().requires_grad_() for t in (M, r, c))
    r_hat, c_hat = rv / rv.sum(-1, keepdim=True), cv / cv.sum(-1, keepdim=True)
    frozen = (
        P
        * torch.exp(-gamma * (Mv - M))
        * (r_hat / r_hat.detach()).unsqueeze(-1)
        * (c_hat / c_hat.detach()).unsqueeze(-2)
    )
    (frozen * W).sum().backward()
    for got, want in ((gM, Mv.grad), (gr, rv.grad), (gc, cv.grad)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_approx_gradient_of_a_log_likelihood_is_constant():
    """Why training the matching task with ``approx`` collapses (docs/benchmarks/approx_ot.md):
    for J = -sum w log P over chosen entries, approx's dJ/dM is gamma w there and 0 elsewhere
    at every M, the gradient of a linear function without a minimum; the exact gradient has
    zero row and column sums (P ignores constants added to a row or column of M)."""
    gamma = 10.0
    chosen = torch.zeros(1, 5, 6, dtype=torch.bool)
    chosen[0, [0, 1, 2, 4], [3, 0, 5, 1]] = True
    w = torch.where(chosen, 0.25, 0.0).double()
    grads = {}
    for seed in (0, 1):
        M, r, c = problem(1, 5, 6, seed=seed)
        for mode in ("approx", "implicit"):
            Mv = M.clone().requires_grad_()
            P = ddn.sinkhorn(Mv, r, c, gamma=gamma, backward_mode=mode, **TIGHT)
            (-(w * P.clamp_min(1e-300).log()).sum()).backward()
            grads[mode, seed] = Mv.grad
    for seed in (0, 1):
        torch.testing.assert_close(grads["approx", seed], gamma * w, rtol=1e-9, atol=1e-12)
        exact = grads["implicit", seed]
        for sums in (exact.sum(-1), exact.sum(-2)):
            torch.testing.assert_close(sums, torch.zeros_like(sums), rtol=0, atol=1e-10)
        assert float(exact[~chosen].min()) < -0.01  # the costs of other pairs raised; approx: 0


def test_implicit_float32_close_to_float64_full():
    """float32 implicit within 1e-4 of the float64 full gradient (scripts/bench_ot.py checks
    the same at m = n = 500)."""
    g = torch.Generator().manual_seed(0)
    torch.randn(1, 200, 200, generator=g)  # (the draw bench_ot uses; this one is the next)
    M = torch.randn(1, 150, 120, generator=g)
    W = torch.randn(1, 150, 120, generator=g)
    one = dict(r=torch.ones(1, 150), c=torch.ones(1, 120))
    ref = _grads("full", M.double(), one["r"].double(), one["c"].double(), W.double(),
                 gamma=10.0, tol=1e-10, max_iter=20000)[1]  # fmt: skip
    for solver in ["cholesky", "cg"]:
        got = _grads("implicit", M, one["r"], one["c"], W, gamma=10.0, implicit_solver=solver,
                     tol=1e-6, max_iter=20000)[1]  # fmt: skip
        rel = float((got.double() - ref).norm() / ref.norm())
        assert rel < 1e-4, (solver, rel)


@pytest.mark.parametrize("B,m", [(2, 200), (4, 160)])
def test_batched_sizes_that_break_lu_solvers(B, m):
    """Batched LU solves fail on some MKL builds from ~150 rows: every path here is Cholesky."""
    M, r, c = problem(B, m, m + 7, dtype=torch.float32, seed=1, kind="randn")
    W = torch.randn(B, m, m + 7)
    for mode, solver in [("implicit", "cholesky"), ("implicit", "cg"), ("full", "auto")]:
        _, gM, gr, gc = _grads(
            mode, M, r, c, W, gamma=5.0, implicit_solver=solver, tol=1e-5, max_iter=5000
        )
        assert torch.isfinite(gM).all() and torch.isfinite(gr).all() and torch.isfinite(gc).all()


@pytest.mark.parametrize("mode", [ddn.BackwardMode.IMPLICIT, ddn.BackwardMode.FULL], ids=str)
def test_near_permutation_plan_gives_finite_gradient_and_warns(mode):
    """Two clusters 9 apart at gamma = 1000 in float32: P is exactly block-diagonal (the cross
    entries underflow), so S is singular beyond the gauge (first found by hypothesis). The
    gradient stays finite and the degeneracy is reported."""
    M = torch.tensor(
        [[0.0, 0.3, 9.0, 9.5], [0.2, 0.0, 9.1, 9.0], [9.0, 9.3, 0.0, 0.4], [9.2, 9.0, 0.1, 0.0]]
    )
    M = torch.stack([M, M.flip(0)]).requires_grad_()
    with pytest.warns(ddn.IllConditionedWarning):
        P = ddn.sinkhorn(M, gamma=1000.0, tol=1e-4, max_iter=300, backward_mode=mode, warn=False)
        (P * torch.randn_like(P)).sum().backward()
    assert torch.isfinite(M.grad).all()


def test_auto_gives_up_on_slow_cg_and_solves_directly(monkeypatch):
    """With a budget of 12 CG iterations, a hard problem (randn costs at gamma 10: CG needs
    ~30) makes auto abandon CG early and solve directly; an easy one (gamma 1) is solved by
    CG within the budget. Either way auto's gradient is the direct solve's."""
    monkeypatch.setattr(schur, "cg_budget", lambda n, m: 12)
    g = torch.Generator().manual_seed(5)
    for gamma, want_cg in [(10.0, False), (1.0, True)]:
        M = torch.randn(1, 60, 60, generator=g, dtype=F64)
        V = torch.randn(1, 60, 60, generator=g, dtype=F64)
        P = ddn.sinkhorn(M, gamma=gamma, tol=1e-9, max_iter=100_000)
        r, c = P.sum(-1), P.sum(-2)
        X = P * V
        rinv, rhs = schur.schur_rhs(P, r, X.sum(-1), X.sum(-2))
        _, ok, it = schur.solve_schur_cg(P, c, rhs, rinv, X, 1e-10, 12, give_up=True)
        assert bool(ok.all()) == want_cg, it
        assert want_cg or it < 12  # gave up before it had spent the budget
        auto = bw.implicit_grads(P, r, c, V, gamma, "auto")[0]
        direct = bw.implicit_grads(P, r, c, V, gamma, "cholesky")[0]
        torch.testing.assert_close(auto, direct, rtol=1e-7, atol=1e-12)


def test_plan_has_no_entries_whose_products_are_denormal():
    """P's tiny entries are flushed (P^T P would hold denormals, 2-3x slower to multiply)."""
    M = torch.randn(1, 50, 60, generator=torch.Generator().manual_seed(0)) * 5
    P = ddn.sinkhorn(M, gamma=10.0, max_iter=5000)
    small = math.sqrt(torch.finfo(P.dtype).tiny)
    assert bool(((P == 0) | (P >= small)).all())
    assert bool((P == 0).any())  # the flush did something on this problem
