"""The generic node on the layer skeleton: the checks every declarative layer passes
(``BaseTester``, on the sphere-projection example), every mode dispatched through its table
entry, the options checked field by field with per-dtype defaults resolved at call time, and
a user solver's own record passed on."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch

import ddn_layers as ddn
from ddn_layers.base import Solved, Unrolled
from ddn_layers.generic.backward import BACKWARDS
from ddn_layers.generic.options import ArgminOptions
from ddn_layers.generic.problem import make_problem
from tests.ddn_layers.generic.helpers import load_example, qp_node, qp_problem
from tests.ddn_layers.testing import ALL_MODES, F64, BaseTester

pytestmark = pytest.mark.usefixtures("single_thread")

SPHERE = load_example("sphere_projection")


class TestArgmin(BaseTester):
    """Constrained, with the user's closed-form (differentiable) solver; ``approx`` is given
    the example's Hessian, which is exact there."""

    functional = staticmethod(
        functools.partial(
            ddn.argmin,
            SPHERE.objective,
            constraints=SPHERE.constraints,
            solver=SPHERE.solve,
            hessian_approx=SPHERE.hessian,
        )
    )

    def module(self, mode, **options):
        return ddn.DeclarativeNode(
            SPHERE.objective,
            SPHERE.constraints,
            solver=SPHERE.solve,
            hessian_approx=SPHERE.hessian,
            backward_mode=mode,
            **options,
        )

    def inputs(self, dtype):
        return (torch.randn(3, 4, dtype=dtype, generator=torch.Generator().manual_seed(0)),)


@pytest.mark.parametrize("mode", ALL_MODES, ids=str)
def test_each_mode_runs_its_table_entry(mode, monkeypatch):
    entry, seen = BACKWARDS[mode], []
    if isinstance(entry, Unrolled):

        def solve(*args) -> Solved:
            seen.append(mode)
            return entry.solve(*args)

        monkeypatch.setitem(BACKWARDS, mode, Unrolled(solve))
    else:
        monkeypatch.setitem(BACKWARDS, mode, lambda ctx, v: seen.append(mode) or entry(ctx, v))
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    y = TestArgmin.functional(x, backward_mode=mode)
    y.sum().backward()
    assert seen == [mode] and x.grad is not None


def test_argmin_signature_and_options_agree():
    """``argmin``'s keyword defaults are the options' defaults (one list of options)."""
    params = inspect.signature(ddn.argmin).parameters
    defaults = ArgminOptions.defaults()
    assert {k: params[k].default for k in defaults} == defaults
    assert set(params) - set(defaults) == {
        "objective",
        "inputs",
        "constraints",
        "solver",
        "init",
        "hessian_approx",
        "backward_mode",
        "return_info",
    }


def test_defaults_are_resolved_per_dtype_and_device():
    problem = make_problem(SPHERE.objective, None, SPHERE.solve, None, None)
    opts = ArgminOptions()
    mode = ddn.BackwardMode.IMPLICIT
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    call64 = opts.for_call(problem, mode, torch.float64, cpu, check_leaves=True)
    call32 = opts.for_call(problem, mode, torch.float32, gpu, check_leaves=True)
    resolved = lambda c: (c.tol, c.cg_tol, c.kkt_tol, c.check_every)  # noqa: E731
    assert resolved(call64) == (1e-10, 1e-10, 1e-6, 1)
    assert resolved(call32) == (1e-5, 1e-5, 1e-3, 8)
    given = ArgminOptions(tol=1e-3, check_every=2).for_call(problem, mode, F64, gpu, False)
    assert (given.tol, given.check_every) == (1e-3, 2)
    assert call64.cg_iters(10) == 50 and call64.cg_iters(10_000) == 1000
    assert ArgminOptions(cg_max_iter=7).for_call(problem, mode, F64, cpu, False).cg_iters(10) == 7


def test_module_holds_validated_options_and_shows_those_set():
    node = qp_node(tol=1e-8, cg_max_iter=30)
    assert node.options == ArgminOptions(tol=1e-8, cg_max_iter=30)
    assert "tol=1e-08, cg_max_iter=30, constrained" in repr(node)
    with pytest.raises(ValueError, match="precondition must be True or False"):
        qp_node(precondition="yes")


@pytest.mark.parametrize("mode", ALL_MODES, ids=str)
def test_a_user_solvers_record_is_passed_on(mode):
    """The solver's iterations, convergence and extra entries reach the caller, beside the
    node's own objective, stationarity and feasibility."""
    q, L, C, d = (t.requires_grad_() for t in qp_problem(B=3))
    qp = qp_node().problem

    def solver_with_record(*inputs):
        iterations = torch.tensor([3, 4, 5])
        converged = torch.tensor([True, True, False])
        extra = {"restarts": torch.tensor([0, 1, 2])}
        record = ddn.SolverInfo(iterations, torch.zeros(3, dtype=F64), converged, extra)
        return qp.solver(*inputs), record

    def hessian(q, L, C, d, y):  # exact: the QP's Hessian
        return L @ L.mT + torch.eye(L.shape[-1], dtype=L.dtype)

    node = ddn.DeclarativeNode(
        qp.objective,
        qp.constraints,
        solver=solver_with_record,
        hessian_approx=hessian,
        backward_mode=mode,
    )
    with pytest.warns(ddn.ConvergenceWarning, match=r"1 of 3 sample"):
        y = node(q, L, C, d)
    info = node.last_info
    assert info.iterations.tolist() == [3, 4, 5]
    assert info.converged.tolist() == [True, True, False]
    assert info.extra["restarts"].tolist() == [0, 1, 2]
    assert set(info.extra) == {"restarts", "objective", "stationarity", "feasibility"}
    (gq,) = torch.autograd.grad(y.sum(), q)
    assert torch.isfinite(gq).all()
