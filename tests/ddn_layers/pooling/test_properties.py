"""Property-based: any input gives a finite y and a finite gradient, or a ValueError."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ddn_layers as ddn
from tests.ddn_layers.pooling.helpers import PENALTY_NAMES
from tests.ddn_layers.testing import ALL_MODES

pytestmark = pytest.mark.usefixtures("single_thread")


@st.composite
def pooling_problems(draw):
    B = draw(st.integers(1, 3))
    C = draw(st.integers(1, 6))
    n = draw(st.integers(1, 7))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    seed = draw(st.integers(0, 2**16))
    x = scale * torch.randn(B, C, n, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    if draw(st.booleans()):  # duplicated points, possibly all of them
        k = draw(st.integers(1, n))
        x[..., :k] = x[..., :1]
    if draw(st.booleans()):  # a far outlier
        x[..., -1] += 100.0 * scale
    alpha = draw(st.sampled_from([1e-2, 1.0, 1e2])) * scale
    return x, alpha


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    problem=pooling_problems(),
    penalty=st.sampled_from(PENALTY_NAMES),
    mode=st.sampled_from(ALL_MODES),
    learn_alpha=st.booleans(),
)
def test_finite_output_and_gradient_for_any_input(problem, penalty, mode, learn_alpha):
    x, alpha = problem
    x = x.requires_grad_()
    a = torch.tensor(alpha, dtype=x.dtype, requires_grad=learn_alpha)
    with warnings.catch_warnings():
        # ill-conditioned or slow samples may warn; what matters is that nothing is NaN
        warnings.simplefilter("ignore", ddn.IllConditionedWarning)
        warnings.simplefilter("ignore", ddn.ConvergenceWarning)
        y = ddn.robust_pool(x, penalty, a, backward_mode=mode)
        v = torch.ones_like(y)
        inputs = (x, a) if learn_alpha else (x,)
        grads = torch.autograd.grad(y, inputs, v, materialize_grads=True)
    assert y.shape == x.shape[:2] and torch.isfinite(y).all()
    for g in grads:
        assert torch.isfinite(g).all()
    # pooling stays inside the bounding box of the points (up to rounding)
    lo, hi = x.detach().amin(-1), x.detach().amax(-1)
    slack = 1e-4 * (hi - lo).abs().amax() + 1e-6 * x.detach().abs().amax()
    assert ((y >= lo - slack) & (y <= hi + slack)).all()


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    dtype=st.sampled_from([torch.float32, torch.float64]),
    scale_pos=st.floats(-1.1, 1.1),
    alpha_pos=st.floats(-1.1, 1.1),
    penalty=st.sampled_from(PENALTY_NAMES),
    mode=st.sampled_from(ALL_MODES),
    seed=st.integers(0, 2**16),
)
def test_extreme_scales_give_finite_results_or_a_value_error(
    dtype, scale_pos, alpha_pos, penalty, mode, seed
):
    """Points and alpha anywhere in the dtype's range and a little beyond (the positions
    are fractions of its largest decimal exponent; half precision is solved in float32):
    squared distances that would overflow or underflow are a ValueError, not NaN."""
    top = math.log10(torch.finfo(dtype).max)
    scale = 10.0 ** min(scale_pos * top, 307.0)
    x = scale * torch.randn(
        2, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    x = x.to(dtype).requires_grad_()
    alpha = 10.0 ** min(alpha_pos * top, 307.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ddn.IllConditionedWarning)
        warnings.simplefilter("ignore", ddn.ConvergenceWarning)
        try:
            y = ddn.robust_pool(x, penalty, alpha, backward_mode=mode)
        except ValueError as e:
            assert any(k in str(e) for k in ("x:", "x contains", "alpha must")), e
            return
        (g,) = torch.autograd.grad(y.sum(), x, materialize_grads=True)
    assert torch.isfinite(y).all() and torch.isfinite(g).all()


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
    bad=st.sampled_from(["nan", "inf", "rank", "alpha"]),
)
def test_bad_inputs_raise_value_error_not_nan(shape, bad):
    x = torch.randn(*shape)
    alpha = 1.0
    if bad == "nan" and x.numel():
        x.view(-1)[0] = float("nan")
    elif bad == "inf" and x.numel():
        x.view(-1)[-1] = float("inf")
    elif bad == "rank":
        x = x.flatten()
    elif bad == "alpha":
        alpha = -1.0
    valid = x.dim() >= 3 and x.numel() > 0 and bool(torch.isfinite(x).all()) and alpha > 0
    if valid:
        assert torch.isfinite(ddn.robust_pool(x, "welsch", alpha)).all()
    else:
        with pytest.raises(ValueError):
            ddn.robust_pool(x, "welsch", alpha)
