"""The median start: the selection network gives torch.median's value, ties and all."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


PATHS = {"network": (8, 512, 49), "counting": (2, 16, 2048)}


def _path(shape: tuple[int, ...]) -> str:
    """Which selection coordinate_median takes for x of this shape on a CPU."""
    x = torch.empty(shape)
    if med._network_pays(shape[-1], x.numel() // shape[-1]):
        return "network"
    return "counting" if med._counting_pays(x) else "torch"


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("requires_grad", [False, True])
def test_coordinate_median_matches_torch(path, requires_grad):
    assert _path(PATHS[path]) == path
    x = torch.randn(*PATHS[path], dtype=torch.float64)
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


def _long_rows(n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(16, n, generator=g, dtype=dtype)
    centre = 3 * torch.randn(16, 1, generator=g, dtype=dtype)
    far = torch.rand(16, n, generator=g) < 0.1
    biased = x.clone()
    biased[:, :: n // med.COUNTING_SAMPLE] += 1e3  # every sampled point far above the rest
    return [
        x,
        torch.where(far, 100 * x, centre + 0.3 * x),  # feature-like: 10% far outliers
        x.clamp_min(0),  # ReLU: half the points 0, the median 0 or just above
        (x - 1.5).clamp_min(0),  # most points 0
        x.exp() * 1e3,  # skewed
        x * 1e-30,
        torch.randint(0, 5, (16, n), generator=g).to(dtype),  # few values, many ties
        torch.full((9, n), -2.5, dtype=dtype),
        torch.arange(n, 0, -1, dtype=dtype).expand(8, n),
        biased,  # the sample misses the median's rank: the bracket's ends are repaired
        -biased,
    ]


@pytest.mark.parametrize("n", [2048, 2049, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_counting_gives_torch_median(n, dtype):
    for x in _long_rows(n, dtype):
        assert med._counting_pays(x)
        assert torch.equal(med._counting_median(x), x.median(-1).values), x


@pytest.mark.parametrize("steps", [0, 1, 2])
def test_counting_with_too_few_steps_still_gives_torch_median(steps):
    """Rows left unsettled take one step along the data, then torch.median: never a guess."""
    for x in _long_rows(2048, torch.float32):
        assert torch.equal(med._counting_median(x, steps=steps), x.median(-1).values)


def test_counting_near_the_largest_float_gives_torch_median():
    big = torch.finfo(torch.float32).max
    x = torch.randn(8, 2048) * 1e37
    x[:, 0] = -big  # the masked extremes would no longer exclude points: torch.median
    x[3, 5] = big
    assert torch.equal(med._counting_median(x), x.median(-1).values)


def test_the_choice_of_selection():
    assert med._counting_pays(torch.empty(1, 128, 4096))  # C = 128, s = 64
    assert not med._counting_pays(torch.empty(1, 4, 4096))  # few rows: torch.median
    assert not med._counting_pays(torch.empty(128, 1024))
    assert not med._counting_pays(torch.empty(128, 4096, dtype=torch.float16))
    assert not med._network_pays(4096, 128)


@pytest.mark.parametrize("shape", [(8, 512, 7, 7), (2, 8, 48, 48)], ids=list(PATHS))
def test_robust_pool_gives_the_same_result_with_its_median(monkeypatch, shape):
    import ddn_layers as ddn
    import ddn_layers.pooling.solver as solver

    x = torch.randn(*shape)
    assert _path(x.flatten(2).shape) != "torch"
    ours = ddn.robust_pool(x, "welsch", 1.0, restarts=2)
    monkeypatch.setattr(solver, "coordinate_median", lambda t: t.median(-1).values)
    assert torch.equal(ddn.robust_pool(x, "welsch", 1.0, restarts=2), ours)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(med.COUNTING_MIN_ROWS, 24),
    n=st.integers(med.COUNTING_MIN_POINTS, 2600),
    distinct=st.sampled_from([2, 7, 100, None]),  # None: continuous
    log_scale=st.floats(-30, 30),
    double=st.booleans(),
    steps=st.sampled_from([None, 0, 1, 3]),
)
def test_counting_is_torch_median_on_random_rows(seed, rows, n, distinct, log_scale, double, steps):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    if distinct is None:
        x = torch.randn(rows, n, generator=g, dtype=dtype)
    else:
        x = torch.randint(0, distinct, (rows, n), generator=g).to(dtype)
    x = x * 10.0**log_scale
    assert torch.equal(med._counting_median(x, steps=steps), x.median(-1).values)
