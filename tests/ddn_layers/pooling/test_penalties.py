"""Table 1: each penalty's kappa1, kappa2 and d kappa1 / d alpha match derivatives of phi."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ddn_layers as ddn
from tests.ddn_layers.pooling.helpers import PENALTY_NAMES, np_phi
from tests.ddn_layers.testing import F64

pytestmark = pytest.mark.usefixtures("single_thread")

# away from the kinks of huber / truncated quadratic at z = alpha
Z = torch.tensor([0.05, 0.3, 0.7, 1.4, 2.5, 6.0], dtype=F64)
ALPHA = torch.tensor(1.1, dtype=F64)


def test_the_registry_is_table_1_and_read_only():
    table_1 = ("quadratic", "pseudo-huber", "huber", "welsch", "truncated-quadratic")
    assert tuple(ddn.PENALTIES) == table_1
    assert [p.is_convex for p in ddn.PENALTIES.values()] == [True, True, True, False, False]
    with pytest.raises(TypeError):
        ddn.PENALTIES["mine"] = ddn.PENALTIES["huber"]


@pytest.mark.parametrize("name", PENALTY_NAMES)
def test_phi_matches_table_1(name):
    p = ddn.PENALTIES[name]
    expected = np_phi(name, Z.numpy(), float(ALPHA))
    np.testing.assert_allclose(p.phi(Z, ALPHA).numpy(), expected, rtol=1e-13)


@pytest.mark.parametrize("name", PENALTY_NAMES)
def test_kappas_are_the_derivatives_of_phi(name):
    p = ddn.PENALTIES[name]
    z = Z.clone().requires_grad_()
    (d1,) = torch.autograd.grad(p.phi(z, ALPHA).sum(), z, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), z)
    k1 = d1.detach() / Z
    torch.testing.assert_close(p.kappa1(Z, ALPHA), k1)
    torch.testing.assert_close(p.kappa2(Z, ALPHA), (d2 - k1) / Z**2)


@pytest.mark.parametrize("name", PENALTY_NAMES)
def test_kappa1_dalpha_is_the_derivative_in_alpha(name):
    p = ddn.PENALTIES[name]
    jac = torch.autograd.functional.jacobian(lambda a: p.kappa1(Z, a), ALPHA)
    torch.testing.assert_close(p.kappa1_dalpha(Z, ALPHA), jac)


@pytest.mark.parametrize("name", PENALTY_NAMES)
def test_finite_at_zero_distance_with_the_right_limits(name):
    p = ddn.PENALTIES[name]
    z0 = torch.zeros(1, dtype=F64)
    k1, k2, k1a = (p.kappa1(z0, ALPHA), p.kappa2(z0, ALPHA), p.kappa1_dalpha(z0, ALPHA))
    assert torch.isfinite(torch.cat([k1, k2, k1a])).all()
    # kappa1(0) = phi''(0), the curvature of phi at its minimum
    phi2 = {"welsch": 1 / ALPHA**2}.get(name, torch.tensor(1.0, dtype=F64))
    torch.testing.assert_close(k1, phi2.reshape(1))


@pytest.mark.parametrize("name", PENALTY_NAMES)
def test_the_solver_assumptions_hold(name):
    """kappa1 >= 0 and kappa2 <= 0 everywhere (rho(z^2) concave: IRLS monotone, Woodbury)."""
    p = ddn.PENALTIES[name]
    z = torch.linspace(0, 20, 401, dtype=F64)
    for a in (0.1, 1.0, 7.0):
        alpha = torch.tensor(a, dtype=F64)
        assert (p.kappa1(z, alpha) >= 0).all()
        assert (p.kappa2(z, alpha) <= 0).all()


@pytest.mark.parametrize("name", PENALTY_NAMES)
def test_scaled_kappas_share_one_positive_factor_per_sample(name):
    p = ddn.PENALTIES[name]
    z = torch.rand(3, 7, dtype=F64) * 3
    z[:, 0] = 0.5  # a point with kappa1 > 0 in each sample, for every penalty
    exact = (p.kappa1(z, ALPHA), p.kappa2(z, ALPHA), p.kappa1_dalpha(z, ALPHA))
    scaled = p.scaled_kappas(z, ALPHA)
    ratio = scaled[0][:, :1] / exact[0][:, :1]
    assert (ratio > 0).all()
    for e, s in zip(exact, scaled, strict=True):
        torch.testing.assert_close(s, e * ratio)


def test_welsch_weights_do_not_underflow_far_from_every_point():
    """randn at C=512 puts every point ~22 alpha away: exp(-242) is 0 in float32."""
    z = torch.full((1, 4), 22.0) + torch.arange(4.0)
    alpha = torch.tensor(1.0)
    assert (ddn.PENALTIES["welsch"].kappa1(z, alpha) == 0).all()
    k1, k2, _ = ddn.PENALTIES["welsch"].scaled_kappas(z, alpha)
    assert k1[0, 0] == 1.0 and (k1 > 0).any() and torch.isfinite(k2).all()
