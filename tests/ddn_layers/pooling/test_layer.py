"""Robust pooling on the layer skeleton: the checks every layer passes (BaseTester), its options
and its backward table."""

from __future__ import annotations

import inspect

import pytest
import torch

import ddn_layers as ddn
from ddn_layers.base import Unrolled
from ddn_layers.pooling.backward import BACKWARDS
from ddn_layers.pooling.options import PoolOptions
from tests.ddn_layers.pooling.helpers import TIGHT, clustered
from tests.ddn_layers.testing import BaseTester

pytestmark = pytest.mark.usefixtures("single_thread")


class TestRobustPool(BaseTester):
    """pseudo-huber (a Hessian defined everywhere) on a small clustered problem, float64; n = 4
    points fewer than C = 5 channels: the Woodbury route, the default at ResNet sizes."""

    functional = staticmethod(ddn.robust_pool)
    options = {"penalty": "pseudo-huber", "alpha": 1.0, **TIGHT}

    def module(self, mode, **options):
        return ddn.RobustPool2d(backward_mode=mode, **options)

    def inputs(self, dtype):
        return (clustered(2, 5, 4, dtype=dtype, seed=31).reshape(2, 5, 2, 2),)


def test_the_options_are_robust_pools_keywords():
    """PoolOptions.defaults() is the public list of options: robust_pool takes each of them,
    with the same default, and no other solver option."""
    params = inspect.signature(ddn.robust_pool).parameters
    keywords = {p.name for p in params.values() if p.kind is p.KEYWORD_ONLY}
    defaults = PoolOptions.defaults()
    assert keywords - {"backward_mode", "return_info"} == set(defaults)
    assert {name: params[name].default for name in defaults} == defaults


def test_the_module_holds_validated_options():
    pool = ddn.RobustPool2d("huber", tol=1e-4, restarts=2)
    assert pool.options == PoolOptions(tol=1e-4, restarts=2)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(pool(x), ddn.robust_pool(x, "huber", tol=1e-4, restarts=2))


def test_every_mode_has_a_backward():
    assert set(BACKWARDS) == set(ddn.BackwardMode)
    assert isinstance(BACKWARDS[ddn.BackwardMode.UNROLL], Unrolled)
