"""A wrong definition or a bad user function fails with a ValueError that says what to fix."""

from __future__ import annotations

import pytest
import torch

import ddn_layers as ddn
from tests.ddn_layers.generic.helpers import EXAMPLES, load_example
from tests.ddn_layers.testing import F64

pytestmark = pytest.mark.usefixtures("single_thread")


def quadratic(x, y):
    return 0.5 * ((y - x) ** 2).sum(-1)


def identity(x):
    return x.clone()


@pytest.fixture
def x():
    return torch.randn(3, 4, dtype=F64)


@pytest.mark.parametrize(
    "objective, match",
    [
        (lambda x, y: (y - x) ** 2, r"one value per sample, shape \(3,\), got \(3, 4\)"),
        (lambda x, y: ((y - x) ** 2).sum(), r"got \(\).*a scalar: keep the batch axis"),
        (lambda x, y: float(((y - x) ** 2).sum()), "got float"),
    ],
    ids=["per-entry", "scalar", "not-a-tensor"],
)
@pytest.mark.parametrize("how", ["solver", "init"])
def test_objective_not_one_value_per_sample(x, objective, match, how):
    kw = {"solver": identity} if how == "solver" else {"init": identity}
    with pytest.raises(ValueError, match=match):
        ddn.argmin(objective, x, **kw)


@pytest.mark.parametrize(
    "solver, match",
    [
        (lambda x: x[:2], r"solver must return y with the batch size 3 on its first axis"),
        (lambda x: x.sum(), r"batch size 3.*got shape \(\)"),
        (lambda x: x.numpy(), "floating-point tensor y, got ndarray"),
        (lambda x: x.long(), r"floating-point tensor y, got \(3, 4\)"),
        (lambda x: x / 0, "NaN or infinite"),
    ],
    ids=["batch", "scalar", "numpy", "integer", "nan"],
)
def test_solver_output_checked(x, solver, match):
    with pytest.raises(ValueError, match=match):
        ddn.argmin(quadratic, x, solver=solver)


def test_init_output_checked(x):
    with pytest.raises(ValueError, match="init must return y with the batch size 3"):
        ddn.argmin(quadratic, x, init=lambda x: x[0])


@pytest.mark.parametrize(
    "constraints, match",
    [
        (lambda x, y: (y**2).sum(), r"constraints must return shape \(3, p\).*got \(\)"),
        (lambda x, y: y.unsqueeze(-1), r"got \(3, 4, 1\)"),
        (lambda x, y: (y**2).sum(0), r"got \(4,\)"),
    ],
)
def test_constraint_output_checked(x, constraints, match):
    with pytest.raises(ValueError, match=match):
        ddn.argmin(quadratic, x, constraints=constraints, solver=identity)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({}, "give solver=solve"),
        ({"solver": identity, "init": identity}, "not both"),
        ({"init": identity, "constraints": lambda x, y: y.sum(-1)}, "constrained node needs"),
        ({"solver": "newton"}, "solver must be callable, got str"),
        ({"solver": identity, "backward_mode": "approx"}, "'approx' needs hessian_approx"),
        ({"solver": identity, "backward_mode": "exact"}, "backward_mode must be one of"),
        ({"solver": identity, "implicit_solver": "lu"}, "implicit_solver must be one of"),
        ({"solver": identity, "tol": -1.0}, "tol must be a finite number > 0"),
        ({"solver": identity, "cg_max_iter": 0}, "cg_max_iter must be an integer >= 1"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(v) or "none",
)
def test_bad_definition_or_option(x, kw, match):
    with pytest.raises(ValueError, match=match):
        ddn.argmin(quadratic, x, **kw)


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['tolerance'\]"):
        ddn.DeclarativeNode(quadratic, init=identity, tolerance=1e-3)
    with pytest.raises(ValueError, match="max_iter must be an integer"):
        ddn.DeclarativeNode(quadratic, init=identity, max_iter=2.5)
    with pytest.raises(ValueError, match="objective must be given"):
        ddn.DeclarativeNode(None, init=identity)


def test_switching_a_module_to_approx_without_an_approximation_fails_at_the_call(x):
    node = ddn.DeclarativeNode(quadratic, init=identity)
    node.backward_mode = "approx"
    with pytest.raises(ValueError, match="needs hessian_approx"):
        node(x)


@pytest.mark.parametrize(
    "inputs, match",
    [
        ((1.0,), "input 0 must be a torch.Tensor, got float"),
        ((torch.tensor(1.0),), "0-d tensor.*expand a shared parameter"),
        ((torch.ones(3, 2), torch.ones(2, 2)), r"input 1 has shape \(2, 2\).*batch size 3"),
        ((torch.tensor([[1.0, float("nan")]]),), "input 0 contains NaN"),
        ((torch.ones(3, 2, dtype=torch.long),), "at least one input must be a floating"),
        ((), "at least one input"),
    ],
    ids=["float", "0-d", "batch", "nan", "integer-only", "none"],
)
def test_bad_inputs(inputs, match):
    def objective(*args):
        return 0.5 * (args[-1] ** 2).sum(-1)

    with pytest.raises(ValueError, match=match):
        ddn.argmin(objective, *inputs, init=lambda *a: torch.zeros(3, 2))


@pytest.mark.parametrize(
    "approx, match",
    [
        (lambda x, y: torch.ones(3, 2), r"must return shape \(3,\), \(3, 4\) \(a diagonal\)"),
        (lambda x, y: torch.zeros(3, 4, dtype=F64), "diagonal has entries <= 0"),
        (lambda x, y: -torch.eye(4, dtype=F64).expand(3, 4, 4), "Cholesky factorisation failed"),
        (lambda x, y: None, "floating-point tensor, got NoneType"),
    ],
    ids=["shape", "non-positive", "indefinite", "none"],
)
def test_bad_hessian_approx(x, approx, match):
    x = x.requires_grad_()
    y = ddn.argmin(quadratic, x, init=identity, hessian_approx=approx, backward_mode="approx")
    with pytest.raises(ValueError, match=match):
        y.sum().backward()


def test_a_parameter_closed_over_is_refused(x):
    """It would silently get no gradient: the implicit backward returns only the inputs'."""
    w = torch.ones(4, dtype=F64, requires_grad=True)

    def objective(x, y):
        return 0.5 * (w * (y - x) ** 2).sum(-1)

    with pytest.raises(ValueError, match="requires grad but is not an input"):
        ddn.argmin(objective, x, init=identity)
    with torch.no_grad():  # no gradient is wanted, so nothing is lost
        ddn.argmin(objective, x, init=identity)
    # unroll differentiates the solver itself, so the parameter does get its gradient
    start = torch.zeros_like  # not the minimum: the Newton step is what depends on w
    y = ddn.argmin(objective, x.requires_grad_(), init=start, backward_mode="unroll")
    y.sum().backward()
    assert w.grad is not None


def test_unroll_needs_a_differentiable_solver(x):
    x.requires_grad_()
    with pytest.raises(ValueError, match="'unroll' differentiates through the solver"):
        ddn.argmin(quadratic, x, solver=lambda x: x.detach(), backward_mode="unroll")


def test_example_definitions_are_valid():
    # the examples define their nodes at import: a regression there would fail here first
    for name in EXAMPLES:
        module = load_example(name)
        assert any(isinstance(v, ddn.DeclarativeNode) for v in vars(module).values())
