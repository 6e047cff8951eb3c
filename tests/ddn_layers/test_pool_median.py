"""The median start: the selection network gives torch.median's value, ties and all."""

from __future__ import annotations

import pytest
import torch

import ddn_layers.pooling.median as med

pytestmark = pytest.mark.usefixtures("single_thread")


def _inputs(n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    return [
        torch.randn(3, 5, n, dtype=dtype),
        torch.randint(0, 3, (2, 7, n)).to(dtype),  # many ties
        torch.full((4, n), -2.5, dtype=dtype),  # all equal
        torch.arange(n, 0, -1, dtype=dtype).expand(6, n),  # sorted descending
    ]


@pytest.mark.parametrize("n", [*range(1, 66), 100, 196])
def test_the_network_gives_torch_median(n):
    for x in _inputs(n, torch.float32) + _inputs(n, torch.float64)[:2]:
        assert torch.equal(med._network_median(x), x.median(-1).values), x


@pytest.mark.parametrize("n", [2, 9, 49])
def test_the_network_in_row_blocks_gives_torch_median(monkeypatch, n):
    """Rows go through the registers a block at a time (one buffer, reused): with blocks of 7
    rows, 50 rows are 7 full blocks and a partial one."""
    monkeypatch.setattr(med, "NETWORK_BLOCK_ROWS", 7)
    for x in (torch.randn(5, 10, n), torch.randint(0, 3, (50, n)).float()):
        assert torch.equal(med._network_median(x), x.median(-1).values)


def test_the_network_is_pruned_to_the_median():
    # Knuth's merge exchange sorts 49 wires with 383 comparators (766 min/max); the median
    # depends on 578 of them, and dead registers are reused
    ops, registers, _ = med.median_program(49)
    assert len(ops) == 578
    assert registers == 50


def test_the_cost_estimate_picks_the_network_only_for_many_short_rows():
    assert med._network_pays(49, 32 * 512)  # ResNet: 4.4 against 17 ms here
    assert not med._network_pays(49, 128)  # few rows: 1 against 0.08 ms
    assert not med._network_pays(4096, 128)  # long rows: no network
    assert not med._network_pays(med.MAX_NETWORK_POINTS + 1, 10**6)
    # ResNet-50 features at batch 128: 16 blocks, ~67 against ~270 ms measured
    assert med._network_pays(49, 128 * 2048)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_coordinate_median_on_the_network_path_matches_torch(requires_grad):
    x = torch.randn(8, 512, 49, dtype=torch.float64)
    assert med._network_pays(49, 8 * 512)
    ref = x.clone().requires_grad_(requires_grad)
    ours = x.clone().requires_grad_(requires_grad)
    expected = ref.median(-1).values
    got = med.coordinate_median(ours)
    assert torch.equal(got, expected)
    if requires_grad:
        w = torch.randn_like(got)
        (expected * w).sum().backward()
        (got * w).sum().backward()
        # distinct values: both send the gradient to the same point
        assert torch.equal(ours.grad, ref.grad)


def test_coordinate_median_gradient_goes_to_a_point_holding_the_median():
    x = torch.randint(0, 4, (8, 512, 49)).double().requires_grad_()
    m = med.coordinate_median(x)
    m.sum().backward()
    assert torch.equal(x.grad.sum(-1), torch.ones_like(m))
    picked = (x.grad * x.detach()).sum(-1)
    assert torch.equal(picked, m.detach())


def test_robust_pool_gives_the_same_result_with_the_network_median(monkeypatch):
    import ddn_layers as ddn
    import ddn_layers.pooling.solver as solver

    x = torch.randn(8, 512, 7, 7)
    assert med._network_pays(49, 8 * 512)
    ours = ddn.robust_pool(x, "welsch", 1.0, restarts=2)
    monkeypatch.setattr(solver, "coordinate_median", lambda t: t.median(-1).values)
    assert torch.equal(ddn.robust_pool(x, "welsch", 1.0, restarts=2), ours)
