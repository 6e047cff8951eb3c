"""The checks every declarative layer passes, written once (in the spirit of kornia's
``testing/base.py::BaseTester``): a layer's test class derives from :class:`BaseTester` and says
how to call the layer and on what inputs; the modes come from ``BackwardMode``, never a list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

import ddn_layers as ddn

F64 = torch.float64
ALL_MODES = tuple(ddn.BackwardMode)
EXACT_MODES = tuple(m for m in ddn.BackwardMode if m is not ddn.BackwardMode.APPROX)
"""The modes that must agree with finite differences (approx is an approximation)."""

TOLERANCES = {
    torch.float16: {"rtol": 1e-2, "atol": 1e-2},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    torch.float64: {"rtol": 1e-7, "atol": 1e-9},
}


def assert_close(actual, expected, *, dtype=None, **overrides):
    """torch.testing.assert_close with this project's tolerances for ``dtype`` (default: that
    of ``actual``); ``overrides`` replace rtol/atol where a check needs its own."""
    tol = dict(TOLERANCES[dtype or actual.dtype])
    tol.update(overrides)
    torch.testing.assert_close(actual, expected, **tol)


class BaseTester:
    """Derive ``TestMyLayer(BaseTester)`` and fill in:

    - ``functional``: the functional form, called ``functional(*inputs, backward_mode=mode,
      **options)``;
    - ``module(mode, **options)``: the ``nn.Module`` with that mode and options;
    - ``inputs(dtype)``: a tuple of tensors (the differentiable ones first, see
      ``differentiable``) of a small, well-conditioned problem;
    - ``options``: keyword options for tight solves (finite differences need y to ~1e-12);
    - ``differentiable``: how many leading inputs gradcheck perturbs;
    - ``gradcheck_tolerances``: gradcheck's atol/rtol, where a layer's solves allow tighter.
    """

    functional: Callable
    options: dict = {}
    differentiable: int = 1
    gradcheck_tolerances: dict = {"atol": 1e-6}
    modes: Sequence[ddn.BackwardMode] = ALL_MODES
    """The modes the layer implements (every layer of this project: all of them)."""
    twice: frozenset = frozenset({ddn.BackwardMode.UNROLL})
    """The modes whose gradient can itself be differentiated (create_graph=True); the others
    must refuse, since a gradient without a graph would make every second derivative zero."""

    def module(self, mode, **options) -> ddn.DeclarativeLayer:
        raise NotImplementedError  # pragma: no cover - each layer's tester defines it

    def inputs(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError  # pragma: no cover - each layer's tester defines it

    def call(self, *inputs, mode, **options):
        return type(self).functional(*inputs, backward_mode=mode, **(self.options | options))

    def _leaves(self, dtype):
        xs = list(self.inputs(dtype))
        k = self.differentiable
        return [x.detach().requires_grad_(True) for x in xs[:k]], xs[k:]

    @pytest.mark.parametrize("mode", EXACT_MODES, ids=str)
    def test_gradcheck_float64(self, mode):
        if mode not in self.modes:
            pytest.skip(f"the layer has no {mode}")
        leaves, rest = self._leaves(F64)
        fn = lambda *xs: self.call(*xs, *rest, mode=mode)  # noqa: E731
        tolerances = self.gradcheck_tolerances
        assert torch.autograd.gradcheck(fn, tuple(leaves), fast_mode=False, **tolerances)

    @pytest.mark.parametrize("mode", ALL_MODES, ids=str)
    def test_module_matches_functional(self, mode):
        if mode not in self.modes:
            pytest.skip(f"the layer has no {mode}")
        inputs = self.inputs(F64)
        layer = self.module(mode, **self.options)
        assert layer.backward_mode is mode
        assert_close(layer(*inputs), self.call(*inputs, mode=mode))
        assert layer.last_info is not None

    def test_exact_modes_agree(self):
        grads = {}
        for mode in (m for m in EXACT_MODES if m in self.modes):
            leaves, rest = self._leaves(F64)
            y = self.call(*leaves, *rest, mode=mode)
            w = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(3))
            grads[mode] = torch.autograd.grad((w * y).sum(), leaves)
        ref = grads.pop(ddn.BackwardMode.IMPLICIT)
        for got in grads.values():
            for a, b in zip(got, ref, strict=True):
                assert_close(a, b, rtol=1e-6, atol=1e-8)

    @pytest.mark.parametrize("mode", ALL_MODES, ids=str)
    def test_second_derivative_is_exact_or_refused(self, mode):
        if mode not in self.modes:
            pytest.skip(f"the layer has no {mode}")
        leaves, rest = self._leaves(F64)
        first, others = leaves[0], [*leaves[1:], *rest]
        fn = lambda x: self.call(x, *others, mode=mode)  # noqa: E731
        (g,) = torch.autograd.grad(fn(first).square().sum(), first)  # first order: every mode
        assert torch.isfinite(g).all()
        if mode in self.twice:
            assert torch.autograd.gradgradcheck(fn, (first,), **self.gradcheck_tolerances)
        else:
            with pytest.raises(RuntimeError, match=f"backward_mode={mode} gives first deriv"):
                torch.autograd.grad(fn(first).square().sum(), first, create_graph=True)

    def test_unknown_mode_is_a_value_error(self):
        with pytest.raises(ValueError, match="backward_mode must be one of"):
            self.call(*self.inputs(F64), mode="newton")
