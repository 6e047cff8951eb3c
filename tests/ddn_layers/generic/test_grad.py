"""Gradients of generic nodes: float64 gradcheck of every mode on the examples and a
constrained QP, several inputs, unused inputs, and the module's behaviour."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import ddn_layers as ddn
from tests.ddn_layers.generic.helpers import TIGHT, load_example, qp_node, qp_problem
from tests.ddn_layers.pooling.helpers import clustered
from tests.ddn_layers.testing import ALL_MODES, EXACT_MODES, F64

pytestmark = pytest.mark.usefixtures("single_thread")


def _pool_node(mode, **options):
    ex = load_example("robust_pooling")
    return ddn.DeclarativeNode(
        ex.objective,
        init=lambda x, a: x.mean(-1),
        hessian_approx=ex.hessian_approx,
        backward_mode=mode,
        tol=TIGHT,
        **options,
    )


@pytest.mark.parametrize("mode", EXACT_MODES, ids=str)
def test_gradcheck_robust_pooling_example(mode):
    node = _pool_node(mode)
    x = clustered(2, 3, 4, seed=1).requires_grad_()
    alpha = torch.tensor([0.7, 1.2], dtype=F64, requires_grad=True)
    assert gradcheck(node, (x, alpha), fast_mode=False, atol=1e-8, rtol=1e-6)


def test_robust_pooling_approx_is_the_isotropic_hessian():
    """``approx`` is not a gradient (gradcheck would rightly fail); it must be Eq. 3 with
    H replaced by (sum kappa1) I, i.e. -(w^T B) with w = v / sum kappa1."""
    ex = load_example("robust_pooling")
    x = clustered(2, 3, 4, seed=1).requires_grad_()
    alpha = torch.tensor([0.7, 1.2], dtype=F64)
    v = torch.randn(2, 3, dtype=F64)
    (g,) = torch.autograd.grad((v * _pool_node("approx")(x, alpha)).sum(), x)
    y = _pool_node("implicit")(x, alpha).detach()
    w = v / ex.hessian_approx(x, alpha, y).unsqueeze(-1)
    xx = x.detach().requires_grad_()
    with torch.enable_grad():
        gy = torch.func.grad(lambda u: ex.objective(xx, alpha, u).sum())(y)
        (expected,) = torch.autograd.grad(gy, xx, grad_outputs=-w)
    assert torch.allclose(g, expected, atol=1e-12)


def test_gradcheck_sphere_projection_example_approx():
    """The exact modes are gradchecked by TestArgmin (test_argmin.py); approx is exact here
    too, because the example's Hessian approximation is the exact Hessian."""
    ex = load_example("sphere_projection")
    ex.project.backward_mode = ddn.BackwardMode.APPROX
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    assert gradcheck(ex.project, (x,), fast_mode=False)


@pytest.mark.parametrize(
    "mode, options",
    [
        ("implicit", {"implicit_solver": "cholesky"}),
        ("implicit", {"implicit_solver": "cg"}),
        ("full", {}),
        ("unroll", {}),
    ],
    ids=["implicit-cholesky", "implicit-cg", "full", "unroll"],
)
def test_gradcheck_qp_every_input(mode, options):
    """Four inputs, each entering the objective, the constraints or both."""
    node = qp_node(backward_mode=mode, **options)
    inputs = tuple(t.requires_grad_() for t in qp_problem(B=2, m=4, p=2))
    assert gradcheck(node, inputs, fast_mode=False)


def test_approx_with_the_exact_hessian_is_exact():
    def hessian(q, L, C, d, y):
        return L @ L.mT + torch.eye(L.shape[-1], dtype=L.dtype)

    exact = qp_node(backward_mode="implicit")
    approx = ddn.DeclarativeNode(
        exact.problem.objective,
        exact.problem.constraints,
        solver=exact.problem.solver,
        hessian_approx=hessian,
        backward_mode="approx",
    )
    inputs = [t.requires_grad_() for t in qp_problem(B=3, m=5, p=2, seed=2)]
    v = torch.randn(3, 5, dtype=F64)
    g1 = torch.autograd.grad((v * exact(*inputs)).sum(), inputs)
    g2 = torch.autograd.grad((v * approx(*inputs)).sum(), inputs)
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("mode", ALL_MODES, ids=str)
def test_unused_and_integer_inputs_get_no_gradient(mode):
    def objective(x, unused, k, y):
        return 0.5 * ((y - x * k.unsqueeze(-1)) ** 2).sum(-1) + 0.25 * (y**4).sum(-1)

    def hessian(x, unused, k, y):
        return 1 + 3 * y**2

    node = ddn.DeclarativeNode(
        objective, init=lambda x, u, k: x, hessian_approx=hessian, backward_mode=mode
    )
    x = torch.randn(3, 2, dtype=F64, requires_grad=True)
    unused = torch.randn(3, 5, dtype=F64, requires_grad=True)
    k = torch.tensor([1, 2, 3])
    y = node(x, unused, k)
    gx, gu = torch.autograd.grad(y.sum(), (x, unused), allow_unused=True)
    assert gu is None and gx is not None and torch.isfinite(gx).all()


def test_only_requested_inputs_are_differentiated():
    q, L, C, d = qp_problem()
    q.requires_grad_()
    y = qp_node()(q, L, C, d)
    (gq,) = torch.autograd.grad(y.sum(), q)
    assert gq.shape == q.shape


def test_samples_are_independent_in_the_batch():
    node = qp_node()
    inputs = qp_problem(B=3, seed=5)
    y = node(*inputs)
    for b in range(3):
        yb = node(*(t[b : b + 1] for t in inputs))
        assert torch.allclose(y[b], yb[0], atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_is_solved_in_float32(dtype):
    ex = load_example("sphere_projection")
    x = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    y = ex.project(x)
    (g,) = torch.autograd.grad(y.float().sum(), x)
    assert y.dtype == dtype and g.dtype == dtype
    assert torch.allclose(y.float(), ex.solve(x.detach().float()), atol=1e-2)


def test_module_is_a_declarative_layer_with_last_info():
    node = _pool_node("implicit")
    assert isinstance(node, ddn.DeclarativeLayer)
    node.backward_mode = "full"
    assert node.backward_mode is ddn.BackwardMode.FULL
    x = clustered(2, 3, 4, seed=1)
    node(x, torch.ones(2, dtype=F64))
    info = node.last_info
    assert info.converged.all() and (info.iterations > 0).all()
    assert set(info.extra) >= {"objective", "stationarity"}
    assert "backward_mode=full" in repr(node)
    with pytest.raises(ValueError, match="backward_mode must be one of"):
        node.backward_mode = "exact"


def test_functional_form_returns_info():
    ex = load_example("sphere_projection")
    x = torch.randn(2, 3, dtype=F64)
    y, info = ddn.argmin(
        ex.objective, x, constraints=ex.constraints, solver=ex.solve, return_info=True
    )
    assert torch.allclose(y, ex.solve(x))
    assert (info.extra["feasibility"] < 1e-14).all() and info.converged.all()
