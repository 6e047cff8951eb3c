"""The forward solve: an independent SciPy reference, monotone descent, outliers, records."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import ddn_layers as ddn
from tests.ddn_layers.pooling.helpers import (
    ITERATIVE,
    NON_CONVEX,
    PENALTY_NAMES,
    clustered,
    np_objective,
    reference_minimum,
)
from tests.ddn_layers.testing import F64

pytestmark = pytest.mark.usefixtures("single_thread")


def _inputs(penalty):
    yield "clustered", clustered(3, 4, 15, alpha=1.0, seed=11)
    yield "n<C", clustered(2, 6, 4, alpha=1.0, seed=12)
    # points straddling alpha, and few points far apart: convex problems keep one minimum;
    # non-convex ones have many local minima there, and a local method from the same starts
    # need not find SciPy's (Nelder-Mead steps across plateaus), so only the mean bound holds
    yield "randn", torch.randn(3, 3, 12, dtype=F64)
    yield "wide", 3.0 * torch.randn(2, 6, 5, dtype=F64)


@pytest.mark.parametrize("penalty", PENALTY_NAMES)
def test_reaches_the_scipy_minimum_and_never_exceeds_the_mean(penalty):
    for kind, x in _inputs(penalty):
        y, info = ddn.robust_pool(x, penalty, 1.0, return_info=True)
        assert info.converged.all(), kind
        for b in range(x.shape[0]):
            X = x[b].numpy()
            ours = np_objective(penalty, X, y[b].numpy(), 1.0)
            at_mean = np_objective(penalty, X, X.mean(1), 1.0)
            assert ours <= at_mean * (1 + 1e-12), kind
            assert info.extra["objective"][b].item() == pytest.approx(ours, rel=1e-9, abs=1e-12)
            if penalty in NON_CONVEX and kind in ("randn", "wide"):
                continue
            starts = [X.mean(1)] + ([np.median(X, 1)] if penalty in NON_CONVEX else [])
            ref = reference_minimum(penalty, X, 1.0, starts)
            assert ours <= ref + 1e-6 * abs(ref) + 1e-12, (kind, b, ours, ref)


def test_quadratic_is_average_pooling():
    x = torch.randn(4, 7, 5, 3, dtype=F64)
    torch.testing.assert_close(ddn.robust_pool(x, "quadratic"), x.mean((2, 3)))
    pool = ddn.RobustPool2d("quadratic")
    avg = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    torch.testing.assert_close(pool(x), avg(x))


@pytest.mark.parametrize("penalty", ITERATIVE)
def test_outliers_move_the_mean_but_not_robust_pooling(penalty):
    """20% of the points moved 30 alpha away along one direction."""
    g = torch.Generator().manual_seed(12)
    B, C, n = 8, 16, 50
    centre = torch.randn(B, C, 1, generator=g)
    x = centre + 0.2 * torch.randn(B, C, n, generator=g) / C**0.5
    inliers_mean = x.mean(-1)
    x[:, 0, : n // 5] += 30.0
    y = ddn.robust_pool(x, penalty, 1.0)
    avg = ddn.robust_pool(x, "quadratic")
    err = (y - inliers_mean).norm(dim=1)
    assert (avg - inliers_mean).norm(dim=1).min() > 5.0
    bound = 0.05 if penalty in NON_CONVEX else 0.5  # redescending: the outliers count ~0
    assert err.max() < bound, err


def test_non_convex_records_the_winning_start():
    """A majority cluster far from the mean, which lies within alpha of a lone pair of points:
    the mean start ends at the pair, the median start in the cluster, and info says the median
    won (the mean scores less than (n - 1) phi_max, so it stays a start of its own)."""
    x = torch.zeros(1, 2, 9, dtype=F64)
    x[0, 0, :5] = 10.0 + 0.01 * torch.arange(5, dtype=F64)  # majority cluster near 10
    x[0, 0, 5:7] = -12.0  # minority cluster
    x[0, 0, 7:] = torch.tensor([1.9, 2.1], dtype=F64)  # a pair 1.2-1.4 from the mean, 3.34
    y, info = ddn.robust_pool(x, "truncated-quadratic", 2.0, return_info=True)
    assert info.extra["start"].tolist() == [1]  # the median
    torch.testing.assert_close(y[0, 0], x[0, 0, :5].mean())
    y_w, info_w = ddn.robust_pool(x, "welsch", 1.0, return_info=True)
    assert (y_w[0, 0] - 10.02).abs() < 0.01


def test_the_default_escapes_a_flat_objective():
    """randn in 64 channels: every point ~11 alpha from the mean and the median, so truncated
    quadratic is flat at both (n alpha^2 / 2, IRLS has no weight to move with); each start
    is moved to the input point nearest it, which scores (n - 1) alpha^2 / 2, a minimum."""
    x = torch.randn(2, 64, 10, dtype=F64)
    for restarts in (0, 3):
        y, info = ddn.robust_pool(
            x, "truncated-quadratic", 1.0, restarts=restarts, return_info=True
        )
        torch.testing.assert_close(info.extra["objective"], torch.full((2,), 4.5, dtype=F64))
        assert ((y[:, :, None] - x).norm(dim=1).amin(-1) < 1e-12).all()  # y is an input point
        assert (info.iterations == 0).all()  # where it is a minimum at once
    x_gr = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ddn.IllConditionedWarning)  # a proper minimum now
        y = ddn.robust_pool(x_gr, "truncated-quadratic")
        (g,) = torch.autograd.grad(y.sum(), x_gr)
    assert torch.isfinite(g).all()


def test_welsch_stays_finite_when_every_weight_underflows():
    """randn at C=512 in float32: exp(-z^2/2) is 0 for every point at the mean."""
    x = torch.randn(4, 512, 49, requires_grad=True)
    y = ddn.robust_pool(x, "welsch", 1.0)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(y).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("penalty", ["pseudo-huber", "welsch"])
def test_newton_finish_cuts_iterations_where_irls_is_slow(penalty):
    """Low dimension, points along one line: IRLS contracts slowly, Newton pays."""
    x = clustered(4, 2, 40, seed=13, outliers=0.3)
    _, irls = ddn.robust_pool(x, penalty, 1.0, newton=False, max_iter=500, return_info=True)
    y, newton = ddn.robust_pool(x, penalty, 1.0, return_info=True)
    y_irls = ddn.robust_pool(x, penalty, 1.0, newton=False, max_iter=500)
    torch.testing.assert_close(y, y_irls, rtol=0, atol=1e-9)
    assert newton.converged.all() and irls.converged.all()
    assert newton.iterations.sum() < irls.iterations.sum()
    assert newton.extra["newton_steps"].sum() > 0


def test_not_converging_warns_and_is_recorded():
    x = clustered(3, 2, 40, seed=14, outliers=0.3)
    with pytest.warns(ddn.ConvergenceWarning, match=r"3 of 3 samples did not converge"):
        _, info = ddn.robust_pool(x, "huber", 1.0, max_iter=1, newton=False, return_info=True)
    assert not info.converged.any() and (info.iterations == 1).all()
    assert (info.residual > 1e-12).all()


def test_converged_samples_are_frozen_while_others_continue():
    easy = torch.ones(1, 3, 30, dtype=F64)  # every point equal: converged at the start
    hard = clustered(1, 3, 30, seed=15, outliers=0.3)
    x = torch.cat([easy, hard])
    y, info = ddn.robust_pool(x, "huber", 1.0, newton=False, return_info=True)
    assert info.iterations[0] == 0 and info.iterations[1] > 3
    torch.testing.assert_close(y[0], torch.ones(3, dtype=F64), rtol=0, atol=0)
    # the same sample alone gives the same answer: no cross-talk in the batch
    y1 = ddn.robust_pool(hard, "huber", 1.0, newton=False)
    torch.testing.assert_close(y[1:], y1, rtol=0, atol=1e-14)


def test_module_records_solver_info_and_reads_mode_changes():
    pool = ddn.RobustPool2d("pseudo-huber", 0.5)
    assert isinstance(pool, ddn.DeclarativeLayer) and pool.last_info is None
    x = torch.randn(2, 3, 4, 4)
    pool(x)
    info = pool.last_info
    assert info.iterations.shape == (2,) and info.converged.all()
    assert set(info.extra) == {"start", "objective", "newton_steps"}
    pool.backward_mode = "full"  # what a run-wide switch does
    x.requires_grad_()
    pool(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert "penalty=pseudo-huber, alpha=0.5" in repr(pool)


@pytest.mark.parametrize("penalty", ["pseudo-huber", "huber", "welsch"])
def test_a_predicted_stop_is_a_true_one(penalty):
    """randn in 512 dimensions contracts fast: problems stop on the predicted residual of the
    step they take. Measured afresh at the returned y, the largest coordinate of the next
    IRLS step (the residual's definition, in float64) is below tol, and the recorded objective
    is the one at y."""
    x = torch.randn(8, 512, 49)
    y, info = ddn.robust_pool(x, penalty, 1.0, return_info=True)
    assert info.converged.all()
    x64, y64 = x.double(), y.double()
    z = torch.linalg.vector_norm(y64[:, :, None] - x64, dim=1)
    p = ddn.PENALTIES[penalty]
    k1 = p.scaled_kappas(z, torch.tensor(1.0, dtype=F64))[0]
    step = ((k1[:, None, :] * x64).sum(-1) / k1.sum(-1, True) - y64).abs().amax(-1)
    res = step / (1.0 + y64.abs().amax(-1))
    assert (res <= 1e-6).all(), res.max()
    f = p.phi(z, torch.tensor(1.0, dtype=F64)).sum(-1)
    torch.testing.assert_close(info.extra["objective"].double(), f, rtol=1e-5, atol=0)


@pytest.mark.parametrize("penalty", ["pseudo-huber", "huber"])
def test_the_predicted_stop_saves_evaluations_and_changes_nothing_else(penalty, monkeypatch):
    """On the same problems, the solver with its predicted stop turned off (a threshold of 0)
    evaluates more iterations (residuals measured) and reaches the same y (to tol): the stop
    is exercised, and harmless."""
    from ddn_layers.pooling import solver

    x = torch.randn(8, 512, 49, generator=torch.Generator().manual_seed(4))
    evaluations = [0]
    measure = solver.step_and_residual

    def counted(*args):
        evaluations[0] += 1
        return measure(*args)

    monkeypatch.setattr(solver, "step_and_residual", counted)
    evals, results = {}, {}
    for name, threshold in (("on", solver.PREDICTED_STOP), ("off", 0.0)):
        monkeypatch.setattr(solver, "PREDICTED_STOP", threshold)
        evaluations[0] = 0
        results[name] = ddn.robust_pool(x, penalty, 1.0, return_info=True)
        evals[name] = evaluations[0]
    assert evals["on"] < evals["off"], evals
    (y_on, info_on), (y_off, info_off) = results["on"], results["off"]
    assert info_on.converged.all() and info_off.converged.all()
    scale = 1.0 + x.abs().amax()
    torch.testing.assert_close(y_on, y_off, rtol=0, atol=2e-6 * float(scale))


@pytest.mark.parametrize("penalty", ["huber", "quadratic"])
def test_the_objective_is_evaluated_only_when_asked(penalty):
    """Without return_info a single start's objective is skipped (a GEMM at a predicted stop;
    for quadratic, a pass over the points that costs more than the mean); y is bit for bit
    the same either way."""
    x = torch.randn(4, 64, 49, generator=torch.Generator().manual_seed(2))
    y = ddn.robust_pool(x, penalty, 1.0)
    y2, info = ddn.robust_pool(x, penalty, 1.0, return_info=True)
    assert torch.equal(y, y2)
    z = torch.linalg.vector_norm(y2.double()[:, :, None] - x.double(), dim=1)
    f = ddn.PENALTIES[penalty].phi(z, torch.tensor(1.0, dtype=F64)).sum(-1)
    torch.testing.assert_close(info.extra["objective"].double(), f, rtol=1e-5, atol=0)


def test_centring_in_blocks_is_the_whole_sum(monkeypatch):
    """On a CPU the centred squared norms are summed a block of channels at a time (no
    (B, C, n) temporary); with blocks of 3 channels they are the one-piece sum, and the
    pooled result is the same to float32 tol."""
    from ddn_layers.pooling import points

    x = torch.randn(3, 301, 7, dtype=F64, generator=torch.Generator().manual_seed(8)) + 5.0
    m = x.mean(-1)
    whole = ((x - m[..., None]) ** 2).sum(1)
    y = ddn.robust_pool(x.float(), "welsch", 2.0)
    monkeypatch.setattr(points, "CENTRING_BLOCK", 64)  # 64 // (3 * 7) = 3 channels a block
    torch.testing.assert_close(points.centred_sq_norms(x, m), whole, rtol=1e-13, atol=0)
    y_blocks = ddn.robust_pool(x.float(), "welsch", 2.0)
    torch.testing.assert_close(y_blocks, y, rtol=0, atol=1e-5 * float(x.abs().max()))


def test_welsch_weights_never_denormal():
    """Weights under sqrt(tiny) are raised to it: denormal operands slow CPU GEMMs ~25x, and
    the floor is 1e-19 of the largest weight in float32, far below rounding."""
    p = ddn.PENALTIES["welsch"]
    sq = torch.tensor([[0.0, 50.0, 200.0, 1e4]])
    w = p.irls_weights_sq(sq, torch.tensor(1.0))
    tiny = torch.finfo(torch.float32).tiny
    assert w[0, 0] == 1 and (w >= tiny**0.5 * 0.99).all()
    k1, k2, _ = p.scaled_kappas(sq.sqrt(), torch.tensor(1.0))
    assert (k1.abs() >= tiny).all() and (k2.abs() >= tiny).all()


def test_iterate_reaching_a_point_far_from_the_mean_stays_finite():
    """Found by hypothesis: C = 1, alpha = 0.01, one point ~30 away from the mean. Next to
    a point the distance identity rounds below zero by ~eps |y - m| |m| (1e-4 here), which
    against alpha^2 = 1e-4 made pseudo-huber's weight the root of a negative number."""
    x = torch.tensor([[[2.109431266784668, 0.3538479804992676, 98.07019805908203]]])
    for mode in ("implicit", "unroll"):
        xg = x.clone().requires_grad_()
        y, info = ddn.robust_pool(xg, "pseudo-huber", 0.01, backward_mode=mode, return_info=True)
        (g,) = torch.autograd.grad(y.sum(), xg)
        assert info.converged.all() and torch.isfinite(y).all() and torch.isfinite(g).all()
        torch.testing.assert_close(y, x[:, :, 0], rtol=0, atol=1e-4)


def test_no_predicted_stop_across_a_newton_step():
    """One channel, 200 points, float64: IRLS contracts slowly and Newton steps finish. The
    ratio of the steps around a Newton step measures Newton's progress, not the IRLS rate;
    predicting from it claimed convergence at up to 163x tol. Measured afresh (the next
    IRLS step at y), every converged sample is within tol."""
    g = torch.Generator().manual_seed(5)
    worst = 0.0
    for k in range(30):
        x = torch.randn(4, 1, 200, dtype=F64, generator=g) * 10 ** (k / 15 - 1)
        alpha = torch.tensor(0.3, dtype=F64)
        y, info = ddn.robust_pool(x, "pseudo-huber", alpha, return_info=True)
        assert info.converged.all() and info.extra["newton_steps"].sum() > 0
        z = torch.linalg.vector_norm(y[:, :, None] - x, dim=1)
        k1 = ddn.PENALTIES["pseudo-huber"].kappa1(z, alpha)
        step = ((k1[:, None, :] * x).sum(-1) / k1.sum(-1, True) - y).norm(dim=-1)
        worst = max(worst, float((step / (alpha + y.abs().amax(-1))).max()))
    assert worst <= 1e-12, worst


def test_wide_features_off_the_origin_converge():
    """The residual is per coordinate: with C = 2048 channels (a ResNet-50 feature map) about
    3 alpha from the origin, the 2-norm of a step floors at sqrt(C) ulps of y, above the
    float32 tol, and such problems used to run to max_iter with a ConvergenceWarning."""
    x = torch.randn(2, 2048, 49) + 3.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, info = ddn.robust_pool(x, "pseudo-huber", 1.0, return_info=True)
    assert info.converged.all()
    assert (info.iterations <= 5).all(), info.iterations
