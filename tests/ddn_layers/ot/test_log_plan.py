"""``log_plan=True``: log P from the potentials, exact where P underflows, differentiated by
every backward mode (balanced and unbalanced), with padding a constant."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.autograd import gradcheck

import ddn_layers as ddn
from tests.ddn_layers.ot.helpers import TIGHT, pad, problem
from tests.ddn_layers.testing import ALL_MODES, EXACT_MODES, BaseTester

PENALTIES = [None, 1.0]
"""The balanced layer and the unbalanced one (both sides soft)."""


def log_sinkhorn(M, r, c, **kw):
    return ddn.sinkhorn(M, r, c, log_plan=True, **kw)


class TestLogPlan(BaseTester):
    """A 3 x 4 problem at gamma 10: log P through every mode; ``full`` and ``unroll`` are
    differentiable twice through it (full's P is rebuilt from the saved log P)."""

    functional = staticmethod(log_sinkhorn)
    options = {"gamma": 10.0, **TIGHT}
    differentiable = 3
    gradcheck_tolerances = {"atol": 1e-7, "rtol": 1e-4}
    twice = frozenset({ddn.BackwardMode.FULL, ddn.BackwardMode.UNROLL})

    def module(self, mode, **options):
        return ddn.OptimalTransport(backward_mode=mode, log_plan=True, **options)

    def inputs(self, dtype):
        return problem(1, 3, 4, dtype=dtype, seed=21)


@pytest.mark.parametrize("rho", PENALTIES, ids=["balanced", "unbalanced"])
@pytest.mark.parametrize("mode", EXACT_MODES, ids=str)
def test_gradcheck_padded(mode, rho):
    """Padding is structural: gradcheck perturbs the real entries and reads the real block."""
    M, r, c = problem(1, 3, 4, seed=4)
    for t in (M, r, c):
        t.requires_grad_()

    def fn(M, r, c):
        M, r, c = pad(M, r, c, 2, 1)
        logP = log_sinkhorn(M, r, c, gamma=10.0, backward_mode=mode, marginal_penalty=rho, **TIGHT)
        assert torch.isneginf(logP[:, 3:]).all() and torch.isneginf(logP[:, :, 4:]).all()
        return logP[:, :3, :4]

    assert gradcheck(fn, (M, r, c), fast_mode=False, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("mode", EXACT_MODES, ids=str)
def test_gradcheck_where_the_plan_underflows(mode):
    """gamma 1000 in float64: entries of P flushed to zero, one below the smallest double (log
    P -952), keep their exact gradient, within 1e-5 of finite differences."""
    M, r, c = problem(1, 2, 3, seed=12)
    kw = dict(gamma=1000.0, tol=1e-13, max_iter=100_000)
    assert (ddn.sinkhorn(M, r, c, **kw) == 0).sum() == 2
    logP = log_sinkhorn(M, r, c, **kw)
    assert (
        torch.isfinite(logP).all()
        and logP.min() < math.log(torch.finfo(M.dtype).smallest_normal) - 40
    )
    fn = lambda M: log_sinkhorn(M, r, c, backward_mode=mode, **kw)  # noqa: E731
    # the finite differences themselves carry the rounding of potentials of size gamma
    assert gradcheck(fn, (M.requires_grad_(),), fast_mode=False, atol=1e-5, rtol=1e-8)


def _real_loss(logP: torch.Tensor, W: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """-sum(W log P) over the real entries, the way an assignment NLL selects them."""
    return -(W[real] * logP[real]).sum() - (torch.where(real, W * logP, 0.0)).sum()


@pytest.mark.parametrize("rho", PENALTIES, ids=["balanced", "unbalanced"])
@pytest.mark.parametrize("mode", ALL_MODES, ids=str)
def test_float32_large_gamma(mode, rho):
    """gamma 1000, float32, padded: log P is log of P where P is representable, finite where
    it underflows, -inf on padding; a loss over the real entries has a finite gradient even
    when the incoming weights on padding are NaN."""
    M, r, c = problem(2, 8, 10, dtype=torch.float32, seed=5)
    M, r, c = pad(M, r, c, 3, 2)
    kw = dict(gamma=1000.0, backward_mode=mode, marginal_penalty=rho, max_iter=3000)
    real = (r > 0).unsqueeze(-1) & (c > 0).unsqueeze(-2)
    Mg = M.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ddn.ConvergenceWarning)  # float32 unroll may stall
        P = ddn.sinkhorn(M, r, c, **kw)
        logP = log_sinkhorn(Mg, r, c, **kw)
    normal = P > torch.finfo(P.dtype).tiny
    assert (P[real] == 0).any()
    torch.testing.assert_close(logP[normal], P[normal].log(), rtol=0, atol=1e-6 * 1000)
    assert torch.isfinite(logP[real]).all() and torch.isneginf(logP[~real]).all()
    W = torch.where(real, torch.rand_like(logP), math.nan)
    _real_loss(logP, W, real).backward()
    assert torch.isfinite(Mg.grad).all() and (Mg.grad[~real] == 0).all()


@pytest.mark.parametrize("rho", PENALTIES, ids=["balanced", "unbalanced"])
def test_approx_holds_the_scalings_fixed(rho):
    """approx for log P: dJ/dM = -gamma W, dJ/dr = W 1 / r, dJ/dc = W^T 1 / c (the r and c
    gradients then pass through the balanced layer's normalisation)."""
    M, r, c = problem(2, 4, 5, seed=9)
    W = torch.randn(2, 4, 5, dtype=M.dtype)
    M.requires_grad_()
    logP = log_sinkhorn(M, r, c, gamma=3.0, backward_mode="approx", marginal_penalty=rho)
    (W * logP).sum().backward()
    torch.testing.assert_close(M.grad, -3.0 * W)


@pytest.mark.parametrize("rho", PENALTIES, ids=["balanced", "unbalanced"])
def test_gradient_matches_that_of_the_plan(rho):
    """Where P is representable, the gradient of J(log P) is that of J(log(P)) through P."""
    M, r, c = problem(2, 5, 4, seed=13)
    W = torch.randn(2, 5, 4, dtype=M.dtype)
    grads = []
    for log in (True, False):
        Mg = M.clone().requires_grad_()
        out = ddn.sinkhorn(Mg, r, c, gamma=5.0, marginal_penalty=rho, log_plan=log, **TIGHT)
        ((W * (out if log else out.log())).sum()).backward()
        grads.append(Mg.grad)
    torch.testing.assert_close(*grads, rtol=1e-8, atol=1e-10)


def test_log_plan_is_an_option():
    with pytest.raises(ValueError, match="log_plan"):
        ddn.OptimalTransport(log_plan="yes")
    ot = ddn.OptimalTransport(log_plan=True)
    assert ot.log_plan and "log_plan=True" in repr(ot)
    M, r, c = problem(1, 3, 3, seed=1)
    torch.testing.assert_close(ot(M, r, c), ddn.sinkhorn(M, r, c, log_plan=True))
