"""Gradients of robust pooling: every mode against finite differences, and against each other."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.autograd import gradcheck

import ddn_layers as ddn
from ddn_layers.base import BackwardContext
from ddn_layers.pooling.backward import BACKWARDS
from ddn_layers.pooling.options import PoolOptions
from tests.ddn_layers.pooling.helpers import NON_CONVEX, PENALTY_NAMES, TIGHT, clustered
from tests.ddn_layers.testing import ALL_MODES, EXACT_MODES, F64

pytestmark = pytest.mark.usefixtures("single_thread")

# (B, C, n): points fewer than channels (the Woodbury path) and more (channel space)
SHAPES = [(1, 5, 3), (3, 5, 3), (1, 3, 6), (3, 3, 6)]


def _pool(mode, penalty, **kw):
    return lambda x, a: ddn.robust_pool(x, penalty, a, backward_mode=mode, **TIGHT, **kw)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}C{}n{}".format(*s))
@pytest.mark.parametrize("mode", EXACT_MODES, ids=str)
@pytest.mark.parametrize("penalty", PENALTY_NAMES)
def test_gradcheck_x_and_alpha(penalty, mode, shape):
    x = clustered(*shape, alpha=1.0, seed=sum(shape)).requires_grad_()
    alpha = torch.tensor(1.0, dtype=F64, requires_grad=penalty != "quadratic")
    assert gradcheck(_pool(mode, penalty), (x, alpha), fast_mode=False, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("solver", ["cholesky", "woodbury"])
@pytest.mark.parametrize("shape", [(2, 5, 3), (2, 3, 6)])
def test_gradcheck_each_implicit_solver_on_both_sides_of_n_eq_c(solver, shape):
    x = clustered(*shape, seed=1).requires_grad_()
    alpha = torch.tensor(0.8, dtype=F64, requires_grad=True)
    f = _pool("implicit", "pseudo-huber", implicit_solver=solver)
    assert gradcheck(f, (x, alpha), fast_mode=False, atol=1e-7, rtol=1e-5)


def _grads(x, penalty, mode, alpha=1.0, **kw):
    x = x.detach().clone().requires_grad_()
    a = torch.tensor(alpha, dtype=x.dtype, requires_grad=penalty != "quadratic")
    y = ddn.robust_pool(x, penalty, a, backward_mode=mode, **kw)
    v = torch.linspace(-1, 1, y.numel(), dtype=x.dtype).reshape(y.shape)
    inputs = (x, a) if a.requires_grad else (x,)
    # materialize: under unroll, truncated quadratic's y has no autograd path to alpha
    return y, torch.autograd.grad((y * v).sum(), inputs, materialize_grads=True)


@pytest.mark.parametrize("penalty", PENALTY_NAMES)
def test_modes_and_solvers_agree(penalty):
    x = clustered(4, 12, 20, seed=3)
    y_ref, g_ref = _grads(x, penalty, "implicit", **TIGHT)
    for mode, kw in [
        ("implicit", {"implicit_solver": "cholesky"}),
        ("implicit", {"implicit_solver": "woodbury"}),
        ("full", {}),
        ("unroll", {}),
    ]:
        y, g = _grads(x, penalty, mode, **TIGHT, **kw)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
        for a, b in zip(g, g_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("penalty", ["quadratic", "truncated-quadratic"])
def test_approx_is_exact_where_kappa2_vanishes(penalty):
    x = clustered(3, 6, 9, seed=4)
    _, g_ref = _grads(x, penalty, "implicit", **TIGHT)
    _, g = _grads(x, penalty, "approx", **TIGHT)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_approx_keeps_translation_equivariance_and_differs_elsewhere():
    """sum_j dy/dx_j = I for the exact Jacobian and, by construction, for approx too."""
    x = clustered(2, 6, 9, seed=5)
    _, (g_exact, _) = _grads(x, "pseudo-huber", "implicit")
    _, (g_approx, _) = _grads(x, "pseudo-huber", "approx")
    v = torch.linspace(-1, 1, 12, dtype=F64).reshape(2, 6)
    torch.testing.assert_close(g_approx.sum(-1), v)
    torch.testing.assert_close(g_exact.sum(-1), v)
    assert (g_approx - g_exact).abs().max() > 1e-3


@pytest.mark.parametrize("penalty", NON_CONVEX)
def test_the_paper_input_is_not_left_on_a_flat_objective(penalty):
    """The paper's benchmark input: randn, C=128, alpha=1 puts every point ~16 alpha from
    the mean and the median. Truncated quadratic is exactly flat at both, Welsch a saddle; the
    forward goes on to a proper minimum at an input point, so the gradient is that of a
    minimiser, with no warning."""
    x = torch.randn(3, 128, 16, dtype=F64, requires_grad=True)
    alpha = torch.tensor(1.0, dtype=F64, requires_grad=True)
    for mode in ("implicit", "full"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ddn.IllConditionedWarning)
            y = ddn.robust_pool(x, penalty, alpha, backward_mode=mode)
            gx, ga = torch.autograd.grad(y.sum(), (x, alpha))
        assert torch.isfinite(y).all() and torch.isfinite(gx).all() and torch.isfinite(ga)
        # y sits on one input point (up to the other points' vanishing weights): dy/dx_j = I
        torch.testing.assert_close(gx.sum(1).amax(-1), torch.full((3,), 128.0, dtype=F64))


@pytest.mark.parametrize("mode", ["implicit", "full", "approx"])
def test_flat_objective_gives_zero_gradient_and_warns(mode):
    """A flat objective (truncated quadratic at the mean of randn points in 128 channels, every
    point ~16 alpha away: H = 0), handed to the backward directly since the forward no longer
    stops there: zero gradients, one warning counting the samples, no NaN."""
    x = torch.randn(3, 128, 16, dtype=F64)
    y, alpha = x.mean(-1), torch.tensor(1.0, dtype=F64)
    call = PoolOptions().for_call(ddn.PENALTIES["truncated-quadratic"], F64, x.device, False)
    ctx = BackwardContext((x, y, alpha), call, (True, True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gx, ga = BACKWARDS[ddn.BackwardMode(mode)](ctx, torch.ones_like(y))
    ill = [w for w in caught if issubclass(w.category, ddn.IllConditionedWarning)]
    assert len(ill) == 1 and "3 of 3 samples" in str(ill[0].message)
    assert (gx == 0).all() and ga == 0


def test_saddle_is_detected_per_sample():
    """Welsch at a point where H is indefinite (two clusters, y between them, and no input point
    scoring lower, so the forward keeps it): only that sample's gradient is zeroed."""
    x = clustered(2, 4, 7, seed=6)
    x0 = torch.zeros(4, 7, dtype=F64)
    # clusters at -1.25 and +1.25 and one point between: the mean and the median are both 0,
    # where d^2 f / dy_0^2 < 0, and IRLS stays there by symmetry; f there is 3.25, at the
    # input points 3.25 (the one at 0) and 3.41
    x0[0, :3], x0[0, 3:6] = -1.25, 1.25
    x = torch.stack([x0, x[1]]).requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = ddn.robust_pool(x, "welsch", 1.0)
        (gx,) = torch.autograd.grad(y.sum(), x)
    assert y[0].abs().max() < 1e-12  # still at the saddle
    assert (gx[0] == 0).all() and (gx[1] != 0).any()
    assert any("1 of 2 samples" in str(w.message) for w in caught)


@pytest.mark.parametrize("solver", ["cholesky", "woodbury"])
def test_batched_systems_of_lu_breaking_size(solver):
    """Batched LU solves fail on these CPUs from ~150 rows at batch >= 2 (DESIGN.md); the
    Cholesky-only path must handle C = 200 (channel space) and n = 180 (Woodbury)."""
    shape = (3, 200, 256) if solver == "cholesky" else (3, 200, 180)
    x = clustered(*shape, seed=7, dtype=torch.float32)
    _, (g, ga) = _grads(x, "pseudo-huber", "implicit", implicit_solver=solver)
    assert torch.isfinite(g).all() and torch.isfinite(ga)
    x64 = x.double()
    _, (g64, _) = _grads(x64, "pseudo-huber", "implicit", implicit_solver=solver)
    torch.testing.assert_close(g.double(), g64, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("penalty", PENALTY_NAMES)
def test_degenerate_inputs_have_finite_exact_gradients(penalty):
    """n = 1 (y = x), all points equal (every z = 0), C = 1: dy/dx is known exactly."""
    v = torch.tensor([[0.5, -2.0, 1.0]], dtype=F64)
    for x, expected in [
        (torch.randn(1, 3, 1, dtype=F64), v[:, :, None]),  # y = x_1
        (torch.ones(1, 3, 4, dtype=F64), v[:, :, None].expand(1, 3, 4) / 4),  # symmetric
    ]:
        for mode in ALL_MODES:
            x = x.clone().requires_grad_()
            y = ddn.robust_pool(x, penalty, 1.0, backward_mode=mode)
            (g,) = torch.autograd.grad((y * v).sum(), x)
            torch.testing.assert_close(g, expected)
    x = clustered(2, 1, 7, seed=8).requires_grad_()
    assert gradcheck(_pool("implicit", penalty), (x, torch.tensor(1.0, dtype=F64)))


@pytest.mark.parametrize("penalty", ["huber", "truncated-quadratic"])
def test_a_point_exactly_at_the_solution(penalty):
    """Points 0, 5, -5 in one channel: y = 0 = x_0 exactly, so z_0 = 0 in kappa1, kappa2.
    Huber: H = 1 + 2/5 - 2/5 = 1, dy/dx_0 = kappa1(0) = 1 and the linear-region points
    contribute kappa1 + kappa2 z^2 = 0; truncated quadratic ignores them outright."""
    x0 = torch.tensor([[[0.0, 5.0, -5.0]]], dtype=F64)
    Mode = ddn.BackwardMode
    expected = {
        Mode.IMPLICIT: [1.0, 0.0, 0.0],
        Mode.FULL: [1.0, 0.0, 0.0],
        # weights held fixed: k1 / sum k1
        Mode.APPROX: [1 / 1.4, 0.2 / 1.4, 0.2 / 1.4] if penalty == "huber" else [1.0, 0.0, 0.0],
        # the mean start is already optimal, so no iteration runs and unrolling
        # differentiates the start: the known bias of unrolled gradients
        Mode.UNROLL: [1 / 3, 1 / 3, 1 / 3],
    }
    assert set(expected) == set(Mode)
    for mode, g_expected in expected.items():
        x = x0.clone().requires_grad_()
        y = ddn.robust_pool(x, penalty, 1.0, backward_mode=mode)
        assert y.item() == 0.0
        (g,) = torch.autograd.grad(y.sum(), x)
        torch.testing.assert_close(g[0, 0], torch.tensor(g_expected, dtype=F64))


def test_learnable_alpha_gets_the_implicit_gradient_in_the_module():
    x = clustered(2, 4, 9, seed=9).reshape(2, 4, 3, 3)
    pool = ddn.RobustPool2d("welsch", 1.3, learn_alpha=True, **TIGHT).double()
    y = pool(x)
    y.sum().backward()
    eps = 1e-6
    with torch.no_grad():
        plus = ddn.robust_pool(x, "welsch", 1.3 * (1 + eps), **TIGHT).sum()
        minus = ddn.robust_pool(x, "welsch", 1.3 * (1 - eps), **TIGHT).sum()
    # d/d log(alpha) = alpha d/d alpha
    fd = (plus - minus) / (2 * eps)
    torch.testing.assert_close(pool.log_alpha.grad, fd, rtol=1e-5, atol=1e-8)


def test_unroll_welsch_alpha_gradient_finite_at_small_alpha():
    """Found by fuzzing the property test: Welsch at alpha = 1e-5 in float32, points ~10
    alpha apart, learnable alpha, ``unroll``. Autograd through the Newton step differentiated
    kappa2 = -e / alpha^4, whose derivative overflowed (inf * 0 = NaN). The scaled kappas now
    carry a factor alpha^2; the gradient matches the implicit one up to what unroll leaves
    out: y is the minimum of the pair of points 0.4 alpha apart, reached in one IRLS step
    from one of them, whose derivative misses the next steps' (about the contraction, 1%)."""
    x = torch.tensor([[[6.6135e-04, 2.6692e-04, 6.1677e-05, 6.2132e-04, -4.5191e-04, -1.6613e-04]]])
    grads = {}
    for mode in ("unroll", "implicit"):
        xg, a = x.clone().requires_grad_(), torch.tensor(1e-5, requires_grad=True)
        y = ddn.robust_pool(xg, "welsch", a, backward_mode=mode)
        grads[mode] = torch.autograd.grad(y.sum(), (xg, a))
        assert all(torch.isfinite(g).all() for g in grads[mode])
    torch.testing.assert_close(grads["unroll"][0], grads["implicit"][0], atol=1e-6, rtol=2e-2)
    torch.testing.assert_close(grads["unroll"][1], grads["implicit"][1], atol=1e-6, rtol=2e-2)


def test_two_huber_points_farther_apart_than_two_alpha():
    """Issue 23, item 4: the minimiser is the whole segment between the points' alpha-balls, H
    is singular in exact arithmetic, and rounding had left the pivots of one route or of
    ``full`` above their floor (a finite, wrong gradient without a warning). Every exact mode
    flags all samples now; ``unroll`` differentiates the mean, where the solver stays."""
    g = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(64, 3, 2, dtype=F64, generator=g)
    x[:, :, 1] += 4.0 * torch.nn.functional.normalize(x[:, :, 1] - x[:, :, 0], dim=1)
    modes = [("implicit", "cholesky"), ("implicit", "woodbury"), ("full", "auto")]
    for mode, solver in modes:
        xg, a = x.clone().requires_grad_(), torch.tensor(1.0, dtype=F64, requires_grad=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = ddn.robust_pool(xg, "huber", a, backward_mode=mode, implicit_solver=solver)
            gx, ga = torch.autograd.grad(y.sum(), (xg, a))
        ill = [w for w in caught if issubclass(w.category, ddn.IllConditionedWarning)]
        assert len(ill) == 1 and "64 of 64 samples" in str(ill[0].message), (mode, solver)
        assert (gx == 0).all() and ga == 0
    xg = x.clone().requires_grad_()
    y = ddn.robust_pool(xg, "huber", 1.0, backward_mode="unroll")
    torch.testing.assert_close(y, x.mean(-1))
    (gx,) = torch.autograd.grad(y.sum(), xg)
    torch.testing.assert_close(gx, torch.full_like(x, 0.5))
