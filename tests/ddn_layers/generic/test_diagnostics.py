"""Nothing fails silently: solves that stop short warn with counts, samples without a
well-defined gradient warn and get zero, and the per-sample record says which."""

from __future__ import annotations

import warnings

import pytest
import torch

import ddn_layers as ddn
from tests.ddn_layers.generic.helpers import load_example, ot_problem, qp_node, qp_problem
from tests.ddn_layers.testing import EXACT_MODES, F64

pytestmark = pytest.mark.usefixtures("single_thread")


def rosenbrock(a, y):
    return (a - y[:, 0]) ** 2 + 100 * (y[:, 1] - y[:, 0] ** 2) ** 2


def test_newton_not_converging_warns_with_counts():
    a = torch.tensor([1.0, 1.5, 2.0], dtype=F64)
    start = lambda a: torch.zeros(3, 2, dtype=F64)  # noqa: E731
    with pytest.warns(ddn.ConvergenceWarning, match=r"max_iter=2 for 3 of 3 sample\(s\)"):
        _, info = ddn.argmin(rosenbrock, a, init=start, max_iter=2, return_info=True)
    assert not info.converged.any() and (info.iterations == 2).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, info = ddn.argmin(rosenbrock, a, init=start, return_info=True)
    assert info.converged.all()
    assert torch.allclose(y, torch.stack([a, a**2], -1), atol=1e-8)


def test_warn_false_silences_but_the_record_keeps_it():
    a = torch.tensor([1.0, 2.0], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = ddn.argmin(
            rosenbrock, a, init=lambda a: -torch.stack([a, a], -1), max_iter=1, warn=False,
            return_info=True,
        )  # fmt: skip
    assert not info.converged.any()


def test_cg_stopping_short_warns_with_counts():
    node = qp_node(cg_max_iter=1)
    inputs = [t.requires_grad_() for t in qp_problem(B=3, m=6, p=2)]
    y = node(*inputs)
    with pytest.warns(ddn.ConvergenceWarning, match=r"Hessian solve.*in \d+ of 9 system"):
        y.sum().backward()


def test_a_solver_off_the_kkt_point_warns():
    ex = load_example("sphere_projection")
    x = torch.randn(4, 3, dtype=F64) * 3
    with pytest.warns(ddn.ConvergenceWarning, match=r"misses the optimality.*4 of 4"):
        _, info = ddn.argmin(
            ex.objective, x, constraints=ex.constraints, solver=lambda x: x, return_info=True
        )
    assert (info.extra["feasibility"] > 1).all() and not info.converged.any()


@pytest.mark.parametrize(
    "mode", [m for m in EXACT_MODES if m is not ddn.BackwardMode.UNROLL], ids=str
)
def test_a_maximum_has_no_gradient_and_warns(mode):
    """-1/2 ||y - x||^2 is stationary at y = x, but it is a maximum: H = -I."""
    x = torch.randn(3, 2, dtype=F64, requires_grad=True)
    y = ddn.argmin(
        lambda x, y: -0.5 * ((y - x) ** 2).sum(-1), x, solver=lambda x: x, backward_mode=mode
    )
    with pytest.warns(ddn.IllConditionedWarning, match=r"not positive definite.*3 of 3"):
        y.sum().backward()
    assert (x.grad == 0).all()


def test_redundant_constraints_are_detected():
    """All m + n marginal constraints of OT: one is implied by the others, so A is rank
    deficient and the multipliers (and the r, c gradients) are not unique (paper, Eq. 16)."""
    gamma = 5.0
    M, r, c = ot_problem(2, 4, 3)
    M.requires_grad_()

    def objective(M, r, c, P):
        return (P * M).sum((1, 2)) + (P * (P.log() - 1)).sum((1, 2)) / gamma

    def constraints(M, r, c, P):
        return torch.cat([P.sum(2) - r, P.sum(1) - c], -1)

    def solve(M, r, c):
        return ddn.sinkhorn(M, r, c, gamma=gamma, tol=1e-14, max_iter=10_000)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        P = ddn.argmin(objective, M, r, c, constraints=constraints, solver=solve)
    kinds = {w.category for w in caught}
    # the solution itself is fine (least-squares multipliers): no convergence complaint
    assert kinds == {ddn.IllConditionedWarning}
    assert "rank deficient at the solution of 2 of 2" in str(caught[0].message)
    with pytest.warns(ddn.IllConditionedWarning, match="drop redundant constraints"):
        P.sum().backward()
    assert (M.grad == 0).all()


def test_cg_handles_an_indefinite_direction_without_nan():
    from ddn_layers.linalg import conjugate_gradient

    A = torch.diag_embed(torch.tensor([[1.0, 2.0, 3.0], [1.0, -1.0, 2.0]], dtype=F64))
    b = torch.ones(2, 3, dtype=F64)
    res = conjugate_gradient(lambda v: (A @ v.unsqueeze(-1)).squeeze(-1), b, rtol=1e-12,
                             max_iter=10)  # fmt: skip
    assert res.converged.tolist() == [True, False]
    assert res.indefinite.tolist() == [False, True]
    assert torch.allclose(res.x[0], torch.tensor([1.0, 0.5, 1 / 3], dtype=F64))
    assert torch.isfinite(res.x).all()
