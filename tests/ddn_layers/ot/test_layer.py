"""Optimal transport on the layer skeleton: the checks every layer passes (BaseTester), its
options and its backward table."""

from __future__ import annotations

import inspect

import pytest
import torch

import ddn_layers as ddn
from ddn_layers.base import Unrolled
from ddn_layers.ot.backward import BACKWARDS
from ddn_layers.ot.function import SPEC
from ddn_layers.ot.options import OTOptions
from tests.ddn_layers.ot.helpers import TIGHT, problem
from tests.ddn_layers.testing import BaseTester


class TestOptimalTransport(BaseTester):
    """A batch of three 5 x 3 problems at gamma 10 with positive, unnormalised marginals:
    gradcheck perturbs M, r and c (r and c through their normalisation)."""

    functional = staticmethod(ddn.sinkhorn)
    options = {"gamma": 10.0, **TIGHT}
    differentiable = 3
    gradcheck_tolerances = {"atol": 1e-7, "rtol": 1e-4}
    twice = frozenset({ddn.BackwardMode.FULL, ddn.BackwardMode.UNROLL})  # full: autograd's solve

    def module(self, mode, **options):
        return ddn.OptimalTransport(backward_mode=mode, **options)

    def inputs(self, dtype):
        return problem(3, 5, 3, dtype=dtype, seed=18)


def test_the_options_are_the_keywords_of_sinkhorn_and_the_module():
    """OTOptions.defaults() is the public list of options: sinkhorn and OptimalTransport take
    each of them, with the same default, and no other solver option."""
    defaults = OTOptions.defaults()
    params = inspect.signature(ddn.sinkhorn).parameters
    keywords = {p.name for p in params.values() if p.kind is p.KEYWORD_ONLY}
    assert keywords - {"backward_mode", "return_info"} == set(defaults)
    assert {name: params[name].default for name in defaults} == defaults
    init = inspect.signature(ddn.OptimalTransport).parameters
    assert set(init) - {"backward_mode"} == set(defaults)
    assert {name: init[name].default for name in defaults} == defaults


def test_the_module_holds_validated_options():
    ot = ddn.OptimalTransport(gamma=3.0, tol=1e-8, implicit_solver="cg")
    assert ot.options == OTOptions(gamma=3.0, tol=1e-8, implicit_solver="cg")
    assert ot.gamma == 3.0 and ot.implicit_solver == "cg"
    M, r, c = problem(2, 4, 5, seed=1)
    ref = ddn.sinkhorn(M, r, c, gamma=3.0, tol=1e-8, implicit_solver="cg")
    torch.testing.assert_close(ot(M, r, c), ref)
    ot.gamma = 5  # an option assigned later is checked too
    assert ot.options.gamma == 5.0
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        ot.gamma = -1.0
    with pytest.raises(ValueError, match=r"implicit_solver must be one of \['auto'"):
        ot.implicit_solver = "lu"


def test_every_mode_has_a_backward():
    assert set(BACKWARDS) == set(ddn.BackwardMode)
    assert isinstance(BACKWARDS[ddn.BackwardMode.UNROLL], Unrolled)


def test_the_solver_record_comes_out_with_its_extras():
    """omega and rate (SolverInfo.extra) come out of the layer's Function in every mode."""
    M, r, c = problem(2, 6, 4, seed=2)
    for mode in ddn.BackwardMode:
        _, info = ddn.sinkhorn(M, r, c, backward_mode=mode, return_info=True)
        assert set(info.extra) == set(SPEC.extra_keys)
        for t in (info.iterations, info.residual, info.converged, *info.extra.values()):
            assert t.shape == (2,) and not t.requires_grad
        assert (info.extra["omega"] >= 1).all() and (info.extra["rate"] >= 0).all()
