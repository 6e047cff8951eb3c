"""Forward of ddn.sinkhorn: against POT, stability at large gamma, convergence reporting."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import ddn_layers as ddn
from ddn_layers.ot.blocks import BlockBuffers, shared_factor_block
from ddn_layers.ot.schedule import OmegaSchedule
from tests.ddn_layers.ot.helpers import TIGHT, problem
from tests.ddn_layers.testing import ALL_MODES, F64

ot = pytest.importorskip("ot")


@pytest.mark.parametrize("m,n,gamma", [(5, 7, 1.0), (30, 20, 10.0), (40, 40, 50.0)])
def test_matches_pot_log_sinkhorn(m, n, gamma):
    M, r, c = problem(2, m, n, seed=m + n, kind="randn")
    P = ddn.sinkhorn(M, r, c, gamma=gamma, **TIGHT)
    for b in range(2):
        a_, b_ = (r[b] / r[b].sum()).numpy(), (c[b] / c[b].sum()).numpy()
        ref = ot.sinkhorn(
            a_,
            b_,
            M[b].numpy(),
            1.0 / gamma,
            method="sinkhorn_log",
            stopThr=1e-14,
            numItermax=200_000,
        )
        np.testing.assert_allclose(P[b].numpy(), ref, rtol=1e-7, atol=1e-12)


def test_unbatched_shared_marginals_and_module():
    M, r, c = problem(1, 6, 9, seed=4)
    P2 = ddn.sinkhorn(M[0], r[0], c[0], gamma=3.0, **TIGHT)
    P3 = ddn.sinkhorn(M, r, c, gamma=3.0, **TIGHT)
    assert P2.shape == (6, 9)
    torch.testing.assert_close(P2, P3[0])
    # shared (unbatched) marginals broadcast over a batch
    Mb = torch.cat([M, 2 * M])
    Pb = ddn.sinkhorn(Mb, r[0], c[0], gamma=3.0, **TIGHT)
    torch.testing.assert_close(Pb[0], P3[0])
    layer = ddn.OptimalTransport(gamma=3.0, tol=1e-13, max_iter=100_000)
    torch.testing.assert_close(layer(Mb, r[0], c[0]), Pb)
    info = layer.last_info
    assert info.iterations.shape == (2,) and bool(info.converged.all())
    assert float(info.residual.max()) <= 1e-13
    assert isinstance(layer, ddn.DeclarativeLayer) and "gamma=3.0" in repr(layer)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("gamma", [100.0, 1000.0])
def test_stable_at_large_gamma(dtype, gamma):
    """gamma * M up to 1e4: no NaN, no underflow to an all-zero row, marginals met."""
    M, r, c = problem(3, 12, 15, dtype=dtype, scale=10.0, seed=7)
    tol = 1e-4 if dtype == torch.float32 else 1e-8
    with warnings.catch_warnings():
        warnings.simplefilter("error", ddn.ConvergenceWarning)
        P, info = ddn.sinkhorn(M, r, c, gamma=gamma, tol=tol, max_iter=50_000, return_info=True)
    assert torch.isfinite(P).all() and (P >= 0).all()
    assert (P.sum(-1) > 0).all() and (P.sum(-2) > 0).all()
    rn, cn = r / r.sum(-1, keepdim=True), c / c.sum(-1, keepdim=True)
    err = (P.sum(-1) - rn).abs().sum(-1) + (P.sum(-2) - cn).abs().sum(-1)
    assert (err <= 2 * tol).all()
    assert (info.residual <= tol).all()


def _plain_sinkhorn_iterations(M, r, c, gamma, tol):
    """Textbook scaling iterations from v = 1, error checked every iteration."""
    K = torch.exp(-gamma * M)
    v = torch.ones_like(c)
    for it in range(1, 200_000):
        u = r / (K @ v)
        v = c / (K.T @ u)
        if (u * (K @ v) - r).abs().sum() <= tol:
            return it
    raise AssertionError("plain Sinkhorn did not converge")


def test_fewer_iterations_than_plain_sinkhorn():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(100, 120, generator=g, dtype=F64)
    r, c = (
        torch.full((100,), 0.01, dtype=F64),
        torch.full((120,), 1 / 120, dtype=F64),
    )
    # gamma = 30: a slowly converging problem, where acceleration matters
    _, info = ddn.sinkhorn(M, r, c, gamma=30.0, tol=1e-6, max_iter=100_000, return_info=True)
    plain = _plain_sinkhorn_iterations(M, r, c, 30.0, 1e-6)
    assert int(info.iterations) < plain / 2, (int(info.iterations), plain)


def test_non_convergence_warns_with_count_and_reports_per_sample():
    M, r, c = problem(3, 20, 20, seed=1, kind="randn")
    M[0] *= 0.01  # easy sample: converges at once
    with pytest.warns(ddn.ConvergenceWarning, match=r"2 of 3 sample\(s\) did not reach"):
        P, info = ddn.sinkhorn(M, r, c, gamma=50.0, tol=1e-12, max_iter=20, return_info=True)
    assert info.converged.tolist() == [True, False, False]
    assert info.iterations.tolist()[1:] == [20, 20]
    assert torch.isfinite(P).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ddn.sinkhorn(M, r, c, gamma=50.0, tol=1e-12, max_iter=20, warn=False)


def test_converged_samples_are_frozen():
    """A batch gives each sample the result it gets alone."""
    M, r, c = problem(3, 15, 12, seed=8, kind="randn")
    M[1] *= 5
    Pb, info = ddn.sinkhorn(M, r, c, gamma=10.0, tol=1e-10, max_iter=50_000, return_info=True)
    for b in range(3):
        Ps, i1 = ddn.sinkhorn(
            M[b : b + 1],
            r[b : b + 1],
            c[b : b + 1],
            gamma=10.0,
            tol=1e-10,
            max_iter=50_000,
            return_info=True,
        )
        torch.testing.assert_close(Pb[b : b + 1], Ps)
        assert int(i1.iterations) == int(info.iterations[b])
    assert len(set(info.iterations.tolist())) > 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ALL_MODES, ids=str)
def test_low_precision_solved_in_float32(dtype, mode):
    M, r, c = problem(2, 8, 6, dtype=torch.float32, seed=2)
    ref = ddn.sinkhorn(M, r, c, gamma=5.0, tol=1e-6)
    Mh = M.to(dtype).requires_grad_()
    P = ddn.sinkhorn(Mh, r.to(dtype), c.to(dtype), gamma=5.0, tol=1e-6, backward_mode=mode)
    assert P.dtype == dtype
    torch.testing.assert_close(P.float(), ref, atol=2e-3, rtol=2e-2)
    P.float().sum().backward()
    assert Mh.grad.dtype == dtype and torch.isfinite(Mh.grad).all()


def test_autocast_safe():
    M, r, c = problem(2, 8, 6, dtype=torch.float32, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        P = ddn.sinkhorn(M.bfloat16(), r, c, gamma=5.0)
    assert torch.isfinite(P).all()


def test_omega_schedule_backs_off_on_blowup_and_on_non_finite_scalings():
    """The over-relaxation factor rises to 2 / (1 + sqrt(1 - mu^2)) on steady decay, halves
    its excess over 1 when the error grows or a scaling leaves the positive reals, and snaps
    back to exactly 1 (plain Sinkhorn, which cannot overshoot) when the excess is small."""
    s = OmegaSchedule(2, eps=1e-16)
    err = 1.0
    for _ in range(2):  # plain iteration with rate 0.9 per step, 10 steps between checks
        err *= 0.9**10
        s.update([err, err], [True, True], 10)
    w = s.omega[0]
    assert w == pytest.approx(2 / (1 + (1 - 0.9) ** 0.5), rel=0.05)
    s.update([err * 10, math.nan], [True, False], 10)  # growth / a NaN scaling
    assert s.omega == pytest.approx([1 + (w - 1) / 2] * 2)
    for _ in range(5):
        s.update([err, math.nan], [True, False], 10)
    assert s.omega[1] == 1.0


def test_omega_schedule_settles_on_plain_iteration_at_the_precision_floor():
    """A setback below 300 eps is rounding noise amplified by omega: from then on the sample
    runs the plain iteration, even if its error falls again (no swinging back)."""
    s = OmegaSchedule(1, eps=1e-7)  # floor 3e-5
    for err in (1e-2, 1e-3, 3e-5 * 0.5):
        s.update([err], [True], 10)
    assert s.omega[0] > 1
    s.update([3e-5 * 0.6], [True], 10)  # no better than the best: a setback at the floor
    assert s.omega[0] == 1.0
    for err in (1e-5, 5e-6, 2e-6):
        s.update([err], [True], 10)
        assert s.omega[0] == 1.0


def test_float32_reaches_tol_near_its_precision_floor_quickly():
    """500 x 500 randn at gamma 10 in float32: tol = 1e-6 is near the rounding floor of the
    marginal error; the over-relaxed solver must not swing there for hundreds of iterations."""
    M = torch.randn(1, 500, 500, generator=torch.Generator().manual_seed(500))
    _, info = ddn.sinkhorn(M, gamma=10.0, tol=1e-6, max_iter=5000, return_info=True)
    assert bool(info.converged.all())
    assert int(info.iterations) <= 400  # 210 measured; 1150 before the floor rule


@pytest.mark.parametrize(("gamma", "cap"), [(10.0, 2000), (50.0, 15000)])
def test_float32_slow_problems_are_not_taken_for_the_floor(gamma, cap):
    """50 x 50 in float32 converges slowly: an error that falls by less than 10% a check
    above the rounding floor must not send it to the plain iteration (with a floor of
    1000 eps gamma 10 took 6430 iterations, 540 now, and gamma 50 did not converge in 20000;
    5970 now)."""
    M = torch.randn(1, 50, 50, generator=torch.Generator().manual_seed(50))
    _, info = ddn.sinkhorn(M, gamma=gamma, tol=1e-6, max_iter=cap, return_info=True)
    assert bool(info.converged.all())


def test_unrolled_solve_stops_where_its_error_stalls():
    """float32 100 x 100 at gamma 10: the log-domain iteration of ``unroll`` stalls at a
    marginal error of ~1.4e-6, above tol = 1e-6. It stops there, unconverged and with a
    warning that says why, instead of recording max_iter iterations of graph (which at
    500 x 500 costs 3.3 MiB an iteration: the OOM kills of the benchmark)."""
    M = torch.randn(1, 100, 100, generator=torch.Generator().manual_seed(100))
    M.requires_grad_()
    with pytest.warns(ddn.ConvergenceWarning, match="stalled at the precision floor"):
        P, info = ddn.sinkhorn(
            M, gamma=10.0, tol=1e-6, max_iter=3000, backward_mode="unroll", return_info=True
        )
    assert not bool(info.converged.any()) and int(info.iterations) < 1000
    assert float(info.residual) < 1e-5
    (g,) = torch.autograd.grad(P.sum() + (P * P).sum(), M)
    assert torch.isfinite(g).all()


def test_unrolled_solve_ending_unconverged_mid_overshoot_gives_a_finite_plan():
    """Found by the property test: costs of 1e3 at gamma 1000 with a marginal entry of 1e-12.
    The over-relaxed log-domain iteration of ``unroll`` overshoots, and a sample that ends
    there unconverged had f + g large enough for exp to overflow (P = inf). Its last column
    update is now a plain one: P is finite, the warning names it, its residual is P's own."""
    M = torch.tensor(
        [[[661.3522, 266.9241], [61.6773, 621.3173]],
         [[-451.9060, -166.1302], [-1522.7686, 381.6839]],
         [[-1027.6086, -563.0528], [-892.2905, -58.2502]]]
    )  # fmt: skip
    r = torch.tensor([[1.7764e-04, 5.6788e-03], [1.6455e-01, 1.2586e-01], [1.0003e-12, 1.8523e-01]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        P, info = ddn.sinkhorn(
            M, r, gamma=1000.0, max_iter=300, backward_mode="unroll", return_info=True
        )
    assert torch.isfinite(P).all() and (P >= 0).all()
    rn = r / r.sum(-1, keepdim=True)
    err = (P.sum(-1) - rn).abs().sum(-1) + (P.sum(-2) - 0.5).abs().sum(-1)
    torch.testing.assert_close(info.residual, err, rtol=1e-4, atol=1e-7)
    bad = int((~info.converged).sum())
    assert bad == 0 or any(issubclass(w.category, ddn.ConvergenceWarning) for w in caught)


@pytest.mark.parametrize("w", [1.03, 1.5, 1.95])
def test_relaxed_block_on_scaled_vectors_matches_the_relaxed_update(w):
    """The shared-factor block keeps u = a u~, v = b v~ and folds a scale back below 1e-4
    (every ~3 steps at w = 1.03, never at 1.95): unscaled, it is the over-relaxed update
    u <- w r / K v + (1 - w) u written out, in float64 (to 1e-8: at w = 1.95 the iteration
    amplifies the different rounding of the two forms to ~3e-10 in 12 steps; an algebra slip
    would be of order one)."""
    g = torch.Generator().manual_seed(0)
    K = torch.rand(2, 7, 5, generator=g, dtype=F64) + 0.1
    r = torch.rand(2, 7, 1, generator=g, dtype=F64) + 0.5
    c = torch.rand(2, 1, 5, generator=g, dtype=F64) + 0.5
    u = torch.rand(2, 7, 1, generator=g, dtype=F64) + 0.5
    v = torch.rand(2, 1, 5, generator=g, dtype=F64) + 0.5
    zero, one = torch.zeros((), dtype=F64), torch.ones((), dtype=F64)
    u0, v0 = u.clone(), v.clone()
    out = BlockBuffers().take(u, v)
    ut, Kut, vt, Kvt, a, b = shared_factor_block(
        K, u, v, K @ v.mT, 1.0, 1.0, r, c, w, 12, zero, one, out
    )
    assert torch.equal(u, u0) and torch.equal(v, v0)  # in place, but in the buffers only
    for _ in range(12):
        u = w * r / (K @ v.mT) + (1 - w) * u
        v = w * c / (u.mT @ K) + (1 - w) * v
    torch.testing.assert_close(a * ut, u, rtol=1e-8, atol=0)
    torch.testing.assert_close(b * vt, v, rtol=1e-8, atol=0)
    torch.testing.assert_close(a * Kut, u.mT @ K, rtol=1e-8, atol=0)
    torch.testing.assert_close(b * Kvt, K @ v.mT, rtol=1e-8, atol=0)


def test_unrolled_over_relaxation_backs_off_when_the_error_stalls():
    """Found by fuzzing the property test: gamma 1000 with a column marginal entry of 3e-5.
    The over-relaxed unrolled iteration kept omega at 1.95 while its error swung between 1.3
    and 1.7 for 300 iterations, and the gradient through them overflowed (NaN). An error
    that does not improve on its best for two checks now backs omega off: the solve
    converges and the gradient is finite."""
    M = torch.tensor(
        [[[-1.5256, -0.7502, -0.6540], [-1.6095, -0.1002, 0.2444], [-0.6629, 0.8073, 0.4391],
          [1.1712, 1.7674, -0.0954], [0.1394, -0.6177, -0.7981], [-0.1316, -0.7984, 0.3357],
          [0.2753, 1.7163, -0.0561]]]
    ).requires_grad_()  # fmt: skip
    c = torch.tensor([[9.0932e-04, 6.7528e-02, 2.6331e-05]])
    P, info = ddn.sinkhorn(
        M, None, c, gamma=1000.0, tol=1e-4, max_iter=300, backward_mode="unroll", return_info=True
    )
    assert bool(info.converged.all())
    (P * torch.randn(P.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert torch.isfinite(M.grad).all()


def test_returned_plan_has_the_marginal_error_reported():
    """Found by fuzzing the property test: float32, gamma 1000, a row marginal entry of 6e-6.
    P was rebuilt from the final log potentials as exp(f + g - gamma M), which re-rounds the
    exponent at the scale of the potentials (~1e3): the returned plan's marginal error was
    2.2e-4 where 4.8e-8 had been measured and convergence to tol = 1e-4 claimed. P is now
    u K v with the kernel the iterations ran on: its own error is the one reported."""
    M = torch.tensor(
        [[[0.6832, -1.8800], [2.4984, 2.7197]], [[-0.2706, -0.7726], [0.0272, 2.2104]]]
    )
    r = torch.tensor([[1.0708e-03, 6.1633e-02], [1.6944e-06, 3.0291e-01]])
    c = torch.tensor([[0.0172, 0.1212], [0.0816, 0.1786]])
    P, info = ddn.sinkhorn(M, r, c, gamma=1000.0, tol=1e-4, max_iter=300, return_info=True)
    assert bool(info.converged.all())
    rn, cn = r / r.sum(-1, keepdim=True), c / c.sum(-1, keepdim=True)
    err = (P.sum(-1) - rn).abs().sum(-1) + (P.sum(-2) - cn).abs().sum(-1)
    assert (err <= 1e-4).all(), err
    torch.testing.assert_close(err, info.residual, rtol=0, atol=1e-6)
