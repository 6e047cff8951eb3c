"""create_graph=True through each layer: a second derivative is exact, or an error says why.

Modes whose backward gives first derivatives only would otherwise hand autograd a gradient
with no graph, and every second derivative through the layer (a gradient penalty, a
Hessian-vector product) would come back zero without a word.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradgradcheck

import ddn_layers as ddn
from tests.ddn_layers.generic.helpers import load_example
from tests.ddn_layers.testing import F64

ONCE = {
    "pool": ("implicit", "full", "approx"),
    "ot": ("implicit", "approx"),
    "generic": ("implicit", "full", "approx"),
}


def pool(mode):
    return lambda x: ddn.robust_pool(x, "pseudo-huber", 1.0, backward_mode=mode, tol=1e-12)


def ot(mode):
    return lambda M: ddn.sinkhorn(M, gamma=2.0, tol=1e-12, max_iter=10_000, backward_mode=mode)


def generic(mode):
    node = load_example("sphere_projection").project
    node.backward_mode = mode
    return node


LAYERS = {
    "pool": (pool, (2, 3, 2, 2)),
    "ot": (ot, (2, 3, 4)),
    "generic": (generic, (3, 4)),
}
CASES = [(layer, mode) for layer in LAYERS for mode in ddn.BackwardMode.choices()]


@pytest.mark.parametrize("layer, mode", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_second_derivative_is_exact_or_refused(layer, mode):
    make, shape = LAYERS[layer]
    fn = make(mode)
    x = torch.rand(*shape, dtype=F64, requires_grad=True)
    # first derivatives work in every mode
    (g,) = torch.autograd.grad(fn(x).square().sum(), x)
    assert torch.isfinite(g).all()
    if mode in ONCE[layer]:
        with pytest.raises(RuntimeError, match=f"backward_mode={mode} gives first derivatives"):
            torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
    else:
        assert gradgradcheck(fn, (x,))
