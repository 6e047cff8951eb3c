"""The generic node written for the two built-in layers gives their gradients (float64, 1e-6).

This is the check the paper recommends: a specialised backward against the generic one.
"""

from __future__ import annotations

import pytest
import torch

import ddn_layers as ddn
from tests.ddn_layers.generic.helpers import TIGHT, load_example, ot_node, ot_problem
from tests.ddn_layers.pooling.helpers import clustered
from tests.ddn_layers.testing import EXACT_MODES, F64

pytestmark = pytest.mark.usefixtures("single_thread")

RTOL = 1e-6


def close(a, b):
    """Relative agreement in the 2-norm; a zero reference (huber's alpha gradient when every
    point is an inlier) must be matched to rounding."""
    return float((a - b).norm()) <= RTOL * max(float(b.norm()), 1e-10)


def _pool_objective(penalty):
    phi = ddn.PENALTIES[penalty].phi

    def objective(x, alpha, y):
        z = (y.unsqueeze(-1) - x).pow(2).sum(1).sqrt()
        return phi(z, alpha.unsqueeze(-1)).sum(-1)

    return objective


def _grads(fn, inputs, v):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*inputs)
    # materialised: under unroll, huber's y has no autograd path to alpha inside the radius
    return y.detach(), torch.autograd.grad((v * y).sum(), inputs, materialize_grads=True)


@pytest.mark.parametrize("mode", EXACT_MODES, ids=str)
@pytest.mark.parametrize("penalty", ["pseudo-huber", "huber"])
@pytest.mark.parametrize("shape", [(3, 6, 4), (2, 3, 9)], ids=["n<C", "n>C"])
def test_robust_pool_with_default_solver(penalty, mode, shape):
    x = clustered(*shape, seed=sum(shape))
    alpha = torch.tensor(0.9, dtype=F64)
    v = torch.randn(shape[:2], dtype=F64)
    node = ddn.DeclarativeNode(
        _pool_objective(penalty), init=lambda x, a: x.mean(-1), backward_mode=mode, tol=TIGHT
    )
    y, (gx, ga) = _grads(lambda x, a: node(x, a.expand(x.shape[0])), (x, alpha), v)
    ref = lambda x, a: ddn.robust_pool(x, penalty, a, backward_mode=mode, tol=TIGHT)  # noqa: E731
    y_ref, (rx, ra) = _grads(ref, (x, alpha), v)
    assert torch.allclose(y, y_ref, atol=1e-11)
    assert close(gx, rx) and close(ga, ra)


def test_robust_pool_non_convex_with_the_layers_forward_as_solver():
    """Welsch has several minima: the user's solver (here the layer's multi-start forward)
    picks one, and the node differentiates at that one."""
    x = clustered(3, 5, 8, seed=4)
    alpha = torch.tensor(1.0, dtype=F64)
    v = torch.randn(3, 5, dtype=F64)
    node = ddn.DeclarativeNode(
        _pool_objective("welsch"),
        solver=lambda x, a: ddn.robust_pool(x, "welsch", a[0], tol=TIGHT),
    )
    _, (gx, ga) = _grads(lambda x, a: node(x, a.expand(3)), (x, alpha), v)
    _, (rx, ra) = _grads(lambda x, a: ddn.robust_pool(x, "welsch", a, tol=TIGHT), (x, alpha), v)
    assert close(gx, rx) and close(ga, ra)


def test_robust_pool_example_matches_at_float64():
    ex = load_example("robust_pooling")
    x = clustered(4, 16, 49, seed=7)
    alpha = torch.tensor(0.5, dtype=F64)
    v = torch.randn(4, 16, dtype=F64)
    ex.pool.backward_mode = "implicit"
    _, (gx, ga) = _grads(lambda x, a: ex.pool(x, a.expand(4)), (x, alpha), v)
    ref = lambda x, a: ddn.robust_pool(x, "pseudo-huber", a, tol=TIGHT)  # noqa: E731
    _, (rx, ra) = _grads(ref, (x, alpha), v)
    assert close(gx, rx) and close(ga, ra)


def _sum_zero(g):
    # r and c are constrained to one total mass: only their sum-zero perturbations are
    # feasible, and ddn.sinkhorn (which normalises) and the raw constraints agree on those
    return g - g.mean(-1, keepdim=True)


@pytest.mark.parametrize(
    "mode, options",
    [
        ("implicit", {"implicit_solver": "cholesky"}),
        ("implicit", {"implicit_solver": "cg"}),
        ("implicit", {"precondition": False}),
        ("full", {}),
        ("approx", {}),  # exact here: the entropy's Hessian is the diagonal given
    ],
    ids=["schur-cholesky", "schur-cg", "no-precond", "full", "approx-exact-diag"],
)
@pytest.mark.parametrize("size", [(2, 5, 4), (1, 3, 7)], ids=lambda s: "B{}m{}n{}".format(*s))
def test_sinkhorn(size, mode, options):
    gamma = 5.0
    M, r, c = ot_problem(*size, seed=size[1])
    V = torch.randn(size, dtype=F64)
    node = ot_node(gamma, backward_mode=mode, **options)
    P, (gM, gr, gc) = _grads(node, (M, r, c), V)
    ref = lambda M, r, c: ddn.sinkhorn(M, r, c, gamma=gamma, tol=1e-14, max_iter=100_000)  # noqa: E731
    P_ref, (rM, rr, rc) = _grads(ref, (M, r, c), V)
    assert torch.allclose(P, P_ref, atol=1e-14)
    assert close(gM, rM)
    assert close(_sum_zero(gr), _sum_zero(rr))
    assert close(_sum_zero(gc), _sum_zero(rc))


@pytest.mark.parametrize("mode", [ddn.BackwardMode.IMPLICIT, ddn.BackwardMode.UNROLL], ids=str)
def test_robust_pool_float32_with_default_tolerances(mode):
    """What training uses: float32 and the default tolerances, to float32's accuracy (looser
    for unroll: both sides differentiate the iterations they ran, which differ)."""
    tol = {ddn.BackwardMode.IMPLICIT: 1e-4, ddn.BackwardMode.UNROLL: 1e-3}[mode]
    ex = load_example("robust_pooling")
    x = clustered(4, 16, 49, seed=2, dtype=torch.float32)
    alpha = torch.tensor(0.5)
    v = torch.randn(4, 16)
    ex.pool.backward_mode = mode
    y, (gx, ga) = _grads(lambda x, a: ex.pool(x, a.expand(4)), (x, alpha), v)
    ref = lambda x, a: ddn.robust_pool(x, "pseudo-huber", a, backward_mode=mode)  # noqa: E731
    y_ref, (rx, ra) = _grads(ref, (x, alpha), v)
    assert y.dtype == gx.dtype == torch.float32
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert float((gx - rx).norm() / rx.norm()) < tol
    assert float((ga - ra).abs() / ra.abs()) < tol
