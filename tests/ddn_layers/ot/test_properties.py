"""Property-based tests: any input gives a valid plan, a warning, or a ValueError; never NaN."""

from __future__ import annotations

import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ddn_layers as ddn
from tests.ddn_layers.testing import ALL_MODES, F64


@st.composite
def ot_problems(draw):
    B = draw(st.integers(1, 3))
    m = draw(st.integers(1, 7))
    n = draw(st.integers(1, 7))
    dtype = draw(st.sampled_from([torch.float32, F64]))
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 10.0, 1e3]))
    gamma = draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0, 100.0, 1000.0]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    M = (scale * torch.randn(B, m, n, generator=g)).to(dtype)

    def marginal(size):
        kind = draw(st.sampled_from(["none", "uniform", "random", "zeros", "spiky"]))
        if kind == "none":
            return None
        if kind == "uniform":
            return torch.ones(B, size, dtype=dtype)
        x = torch.rand(B, size, generator=g).to(dtype)
        if kind == "zeros":  # padding, maybe all zeros in a sample (a ValueError)
            x = x * (torch.rand(B, size, generator=g) > 0.5).to(dtype)
        if kind == "spiky":
            x = x**8 + 1e-12
        return x

    return M, marginal(m), marginal(n), gamma


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=ot_problems(), mode=st.sampled_from(ALL_MODES))
def test_valid_plan_warning_or_value_error(problem, mode):
    M, r, c, gamma = problem
    M = M.clone().requires_grad_()
    tol = 1e-4 if M.dtype == torch.float32 else 1e-8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            P, info = ddn.sinkhorn(
                M, r, c, gamma=gamma, tol=tol, max_iter=300, backward_mode=mode, return_info=True
            )
        except ValueError as e:
            # the only invalid inputs generated: a marginal that is zero in a whole sample
            assert "must have a positive entry" in str(e)
            return
    assert torch.isfinite(P).all() and (P >= 0).all()
    warned = any(issubclass(w.category, ddn.ConvergenceWarning) for w in caught)
    if not warned:
        assert bool(info.converged.all())
        rr = torch.ones_like(P[..., 0]) if r is None else r
        cc = torch.ones_like(P[..., 0, :]) if c is None else c
        rr, cc = rr / rr.sum(-1, keepdim=True), cc / cc.sum(-1, keepdim=True)
        err = (P.sum(-1) - rr).abs().sum(-1) + (P.sum(-2) - cc).abs().sum(-1)
        assert (err <= 2 * tol).all()
    (P * torch.randn_like(P)).sum().backward()
    assert torch.isfinite(M.grad).all()
