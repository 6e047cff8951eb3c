"""Unbalanced OT through ddn.sinkhorn(..., marginal_penalty=rho) and ddn.OptimalTransport:
the layer checks (BaseTester), gradients of every mode, the balanced limit, padding, bad
input, low precision."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.autograd import gradcheck

import ddn_layers as ddn
from tests.ddn_layers.ot.helpers import TIGHT, pad, problem
from tests.ddn_layers.testing import ALL_MODES, EXACT_MODES, F64, BaseTester

INF = math.inf


class TestUnbalancedTransport(BaseTester):
    """A 4 x 3 problem with positive masses of different totals, a different penalty on each
    side: gradcheck perturbs M, r and c (batches: the other tests)."""

    functional = staticmethod(ddn.sinkhorn)
    options = {"gamma": 5.0, "marginal_penalty": (0.5, 2.0), **TIGHT}
    differentiable = 3
    gradcheck_tolerances = {"atol": 1e-7, "rtol": 1e-4}
    twice = frozenset({ddn.BackwardMode.FULL, ddn.BackwardMode.UNROLL})

    def module(self, mode, **options):
        return ddn.OptimalTransport(backward_mode=mode, **options)

    def inputs(self, dtype):
        return problem(1, 4, 3, dtype=dtype, seed=18)


CASES = [
    # (B, m, n, gamma, marginal_penalty, uniform marginals, padded)
    (1, 3, 5, 10.0, (INF, 1.0), False, False),
    (1, 4, 3, 10.0, (0.3, INF), False, True),
    (1, 4, 3, 30.0, 0.2, True, False),
]


@pytest.mark.parametrize("mode", EXACT_MODES, ids=str)
@pytest.mark.parametrize("B,m,n,gamma,rho,uniform,padded", CASES)
def test_gradcheck_float64(mode, B, m, n, gamma, rho, uniform, padded):
    """Semi-relaxed on either side, both relaxed, padded, m != n: within 1e-7 + 1e-4 |g| of
    finite differences."""
    M, r, c = problem(B, m, n, uniform=uniform, seed=m * n + B, kind="randn")
    inputs = [M.requires_grad_()] + ([] if uniform else [r.requires_grad_(), c.requires_grad_()])

    def fn(M, r=None, c=None):
        if padded:
            M, r, c = pad(M, r, c, 2, 1)
        return ddn.sinkhorn(M, r, c, gamma=gamma, marginal_penalty=rho, backward_mode=mode, **TIGHT)

    assert gradcheck(fn, tuple(inputs), fast_mode=False, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("shape", [(1, 6, 8), (1, 8, 6)])
def test_gradcheck_cg(shape):
    """Six real entries on the smaller side, so that implicit_solver="cg" runs CG (the other
    tests run the direct solve, which "auto" chooses at these sizes)."""
    M, r, c = problem(*shape, seed=3)
    for t in (M, r, c):
        t.requires_grad_()

    def fn(M, r, c):
        return ddn.sinkhorn(
            M, r, c, gamma=3.0, marginal_penalty=(1.0, 3.0), implicit_solver="cg", **TIGHT
        )

    assert gradcheck(fn, (M, r, c), fast_mode=False, atol=1e-7, rtol=1e-4)


def _grads(mode, M, r, c, W, **kw):
    M, r, c = (t.detach().clone().requires_grad_() for t in (M, r, c))
    P = ddn.sinkhorn(M, r, c, backward_mode=mode, **kw)
    (P * W).sum().backward()
    return P.detach(), M.grad, r.grad, c.grad


@pytest.mark.parametrize("shape,rho", [((2, 16, 10), (1.0, 1.0)), ((2, 10, 16), (INF, 0.5))])
def test_modes_agree(shape, rho):
    M, r, c = problem(*shape, seed=11, kind="randn")
    W = torch.randn(shape, dtype=M.dtype)
    kw = dict(gamma=10.0, marginal_penalty=rho, **TIGHT)
    ref = _grads("full", M, r, c, W, **kw)
    for mode, solver in [("implicit", "cholesky"), ("implicit", "cg"), ("unroll", "auto")]:
        got = _grads(mode, M, r, c, W, implicit_solver=solver, **kw)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("rho", [None, INF, (INF, INF), [INF, INF]], ids=str)
def test_infinite_penalty_is_the_balanced_layer(rho):
    """None and inf on both sides take the balanced layer's path: P and every mode's
    gradients bit for bit."""
    M, r, c = problem(2, 6, 5, seed=4, kind="randn")
    W = torch.randn(2, 6, 5, dtype=M.dtype)
    for mode in ALL_MODES:
        want = _grads(mode, M, r, c, W, gamma=10.0)
        got = _grads(mode, M, r, c, W, gamma=10.0, marginal_penalty=rho)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_large_penalty_approaches_the_balanced_plan():
    """rho -> inf: the plan of unit masses tends to the balanced one, at a rate 1 / rho."""
    M, r, c = problem(2, 6, 5, seed=4, kind="randn")
    r, c = r / r.sum(-1, keepdim=True), c / c.sum(-1, keepdim=True)
    P = ddn.sinkhorn(M, r, c, gamma=10.0, **TIGHT)
    errs = [
        float((ddn.sinkhorn(M, r, c, gamma=10.0, marginal_penalty=rho, **TIGHT) - P).abs().max())
        for rho in (1e2, 1e4)
    ]
    assert errs[1] < 2e-4 * float(P.max()) and errs[1] < errs[0] / 50


def test_zero_entry_decouples_exactly_in_every_mode():
    """A zero entry of r (or c) is padding: its row of P and its gradients are zero, and the
    rest is the problem without it."""
    M, r, c = problem(2, 5, 4, seed=5, kind="randn")
    W = torch.randn(2, 5, 4, dtype=M.dtype)
    Mp, rp, cp = pad(M, r, c, 3, 2)
    Wp = torch.randn(Mp.shape, dtype=M.dtype)
    Wp[:, :5, :4] = W
    kw = dict(gamma=10.0, marginal_penalty=(0.7, 2.0), **TIGHT)
    for mode in ALL_MODES:
        P, gM, gr, gc = _grads(mode, M, r, c, W, **kw)
        Pp, gMp, grp, gcp = _grads(mode, Mp, rp, cp, Wp, **kw)
        assert torch.all(Pp[:, 5:] == 0) and torch.all(Pp[:, :, 4:] == 0)
        assert torch.all(gMp[:, 5:] == 0) and torch.all(gMp[:, :, 4:] == 0)
        assert torch.all(grp[:, 5:] == 0) and torch.all(gcp[:, 4:] == 0)
        torch.testing.assert_close(Pp[:, :5, :4], P, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(gMp[:, :5, :4], gM, rtol=1e-7, atol=1e-11)
        torch.testing.assert_close(grp[:, :5], gr, rtol=1e-7, atol=1e-11)
        torch.testing.assert_close(gcp[:, :4], gc, rtol=1e-7, atol=1e-11)


def test_masses_are_taken_as_given():
    """Scaling r changes the plan's mass (the balanced layer would normalise it away: there
    the gradient of r is orthogonal to r), here by 3^0.55 for rho = 1 on both sides."""
    M, r, c = problem(1, 6, 5, seed=9)
    W = torch.randn(1, 6, 5, dtype=M.dtype)
    P1, _, gr, _ = _grads("implicit", M, r, c, W, gamma=5.0, marginal_penalty=1.0, **TIGHT)
    P3 = ddn.sinkhorn(M, 3 * r, c, gamma=5.0, marginal_penalty=1.0, **TIGHT)
    assert float(P3.sum()) > 1.5 * float(P1.sum())
    assert abs(float((gr * r).sum())) > 1e-3 * float(gr.abs().sum() * r.max())


def test_approx_is_the_gradient_with_the_scalings_held_fixed():
    """P = diag(U) (r c^T o exp(-gamma M)) diag(V) with U, V constant: the derivative in M,
    r and c alike."""
    gamma = 3.0
    M, r, c = problem(2, 6, 5, seed=4)
    W = torch.randn(2, 6, 5, dtype=M.dtype, generator=torch.Generator().manual_seed(1))
    P, gM, gr, gc = _grads("approx", M, r, c, W, gamma=gamma, marginal_penalty=0.5, **TIGHT)
    Mv, rv, cv = (t.detach().clone().requires_grad_() for t in (M, r, c))
    frozen = P * torch.exp(-gamma * (Mv - M)) * (rv / r).unsqueeze(-1) * (cv / c).unsqueeze(-2)
    (frozen * W).sum().backward()
    for got, want in ((gM, Mv.grad), (gr, rv.grad), (gc, cv.grad)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


BAD_PENALTIES = [-1.0, 0.0, math.nan, (1.0, -2.0), (1.0, 2.0, 3.0), "big", True]


@pytest.mark.parametrize("rho", BAD_PENALTIES, ids=str)
def test_bad_penalty_is_a_value_error_naming_it(rho):
    M, r, c = problem(2, 4, 5, seed=1)
    with pytest.raises(ValueError, match="marginal_penalty"):
        ddn.sinkhorn(M, r, c, marginal_penalty=rho)
    with pytest.raises(ValueError, match="marginal_penalty"):
        ddn.OptimalTransport(marginal_penalty=rho)


def test_penalty_tensor_with_grad_is_refused():
    with pytest.raises(ValueError, match="marginal_penalty"):
        ddn.OptimalTransport(marginal_penalty=torch.tensor(1.0, requires_grad=True))


def test_module_option_record_and_warning():
    """The module holds the checked pair (assignable); its record has the annealing stages;
    a sample that misses tol is a ConvergenceWarning with the count."""
    layer = ddn.OptimalTransport(gamma=10.0, marginal_penalty=2.0, tol=1e-4, max_iter=60)
    assert layer.marginal_penalty == (2.0, 2.0) and "marginal_penalty=(2.0, 2.0)" in repr(layer)
    M, r, c = problem(2, 8, 9, seed=5)
    M[1] *= 300.0  # a near-permutation: far from converged after 60 iterations
    with pytest.warns(ddn.ConvergenceWarning, match=r"1 of 2 sample\(s\) did not reach"):
        layer(M, r, c)
    info = layer.last_info
    assert info.converged.tolist() == [True, False]
    assert set(info.extra) == {"omega", "stages"} and info.iterations[1] == 60
    layer.marginal_penalty = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(layer(M, r, c), ddn.sinkhorn(M, r, c, gamma=10.0, tol=1e-4, max_iter=60))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_solved_in_float32(dtype):
    M, r, c = problem(2, 6, 5, dtype=torch.float32, seed=2)
    P = ddn.sinkhorn(M.to(dtype), r.to(dtype), c.to(dtype), marginal_penalty=1.0)
    assert P.dtype == dtype
    ref = ddn.sinkhorn(M.to(dtype).float(), r.to(dtype).float(), c.to(dtype).float(),
                       marginal_penalty=1.0)  # fmt: skip
    torch.testing.assert_close(P.float(), ref, rtol=1e-2, atol=1e-3)


def test_stall_at_the_float32_floor_is_a_warning_that_says_so():
    M, r, c = problem(1, 60, 50, dtype=torch.float32, seed=4, kind="randn")
    with pytest.warns(ddn.ConvergenceWarning, match="stalled at the precision floor"):
        ddn.sinkhorn(M, r, c, marginal_penalty=1.0, tol=1e-12, max_iter=5000)


def test_float32_large_gamma_gradient_is_finite():
    """gamma 1000 on costs of scale 10 (annealed): finite plan and gradients, float32."""
    M, r, c = problem(2, 12, 15, dtype=torch.float32, scale=10.0, seed=7, kind="randn")
    for mode in ("implicit", "full"):
        Mg = M.clone().requires_grad_()
        P = ddn.sinkhorn(Mg, r, c, gamma=1000.0, marginal_penalty=1.0, tol=1e-4,
                         max_iter=20_000, backward_mode=mode)  # fmt: skip
        P.sum().backward()
        assert torch.isfinite(P).all() and torch.isfinite(Mg.grad).all()


def test_unbatched_input():
    M, r, c = problem(1, 4, 6, dtype=F64, seed=3)
    P2 = ddn.sinkhorn(M[0], r[0], c[0], marginal_penalty=1.0, **TIGHT)
    P3 = ddn.sinkhorn(M, r, c, marginal_penalty=1.0, **TIGHT)
    assert P2.shape == (4, 6)
    torch.testing.assert_close(P2, P3[0])
