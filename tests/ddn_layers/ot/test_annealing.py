"""The balanced forward at large gamma: per-sample annealing of gamma with eager Newton steps,
and the stall rule that stops a float32 sample at its precision floor."""

from __future__ import annotations

import warnings

import pytest
import torch

import ddn_layers as ddn
from ddn_layers.ot import annealing
from ddn_layers.ot.annealed import ANNEAL_ABOVE, solve_annealed
from ddn_layers.ot.solver import solve_sinkhorn


def _uniform(B, m, n, dtype=torch.float64):
    return torch.full((B, m), 1 / m, dtype=dtype), torch.full((B, n), 1 / n, dtype=dtype)


@pytest.mark.parametrize(("scale", "gamma"), [(10.0, 1000.0), (1.0, 3000.0)])
def test_large_gamma_converges_within_5000_iterations(scale, gamma):
    """Issue 21's problems: 50 x 60, batch 2, float64, tol 1e-6 (max_iter ran out before)."""
    M = scale * torch.randn(
        2, 50, 60, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    P, info = ddn.sinkhorn(M, gamma=gamma, tol=1e-6, max_iter=5000, return_info=True)
    assert bool(info.converged.all()) and int(info.iterations.max()) < 5000
    assert (info.extra["stages"] > 1).all() and not info.extra["stalled"].any()
    err = (P.sum(-1) - 1 / 50).abs().sum(-1) + (P.sum(-2) - 1 / 60).abs().sum(-1)
    assert (err <= 1e-6).all()


def test_a_sample_gives_in_a_batch_what_it_gives_alone():
    """Schedules are per sample: an annealed sample beside a single-stage one (and a padded
    one) gives the plan, iterations and stages it gives alone."""
    g = torch.Generator().manual_seed(3)
    M = torch.randn(3, 12, 15, generator=g, dtype=torch.float64)
    M[1] *= 20  # gamma times its spread far above ANNEAL_ABOVE
    r, c = _uniform(3, 12, 15)
    r[2, 9:], c[2, 13:] = 0, 0
    r, c = r / r.sum(-1, keepdim=True), c / c.sum(-1, keepdim=True)
    gamma = 50.0
    sol, stages = solve_annealed(M, r, c, gamma, 1e-9, 20_000)
    assert stages.tolist()[0] == 1 and stages.tolist()[1] > 1
    for b in range(3):
        one, k = solve_annealed(M[b : b + 1], r[b : b + 1], c[b : b + 1], gamma, 1e-9, 20_000)
        torch.testing.assert_close(sol.P[b : b + 1], one.P)
        assert int(one.iterations) == int(sol.iterations[b]) and float(k) == float(stages[b])


def test_annealing_only_where_it_pays():
    assert annealing.schedule(10.0, 5.0, ANNEAL_ABOVE) == [10.0]
    assert annealing.schedule(1000.0, 1.0, ANNEAL_ABOVE) == [62.5, 250.0, 1000.0]
    M = torch.rand(2, 8, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r, c = _uniform(2, 8, 9)
    plain = solve_sinkhorn(M, r, c, 10.0, 1e-9, 5000)
    sol, stages = solve_annealed(M, r, c, 10.0, 1e-9, 5000)
    assert (stages == 1).all() and torch.equal(sol.P, plain.P)
    assert torch.equal(sol.iterations, plain.iterations)


def test_a_warm_start_at_the_solution_converges_at_once():
    M = torch.randn(2, 10, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    r, c = _uniform(2, 10, 12)
    sol = solve_sinkhorn(M, r, c, 30.0, 1e-10, 10_000)
    again = solve_sinkhorn(M, r, c, 30.0, 1e-10, 10_000, start=(sol.f, sol.g))
    assert again.converged.all() and int(again.iterations.max()) <= 10
    torch.testing.assert_close(again.P, sol.P, rtol=1e-8, atol=1e-12)


def test_float32_stops_at_its_floor_and_says_so():
    """float32 at gamma 1000 on costs of scale 10: a sample whose error settles above tol at
    its precision floor stops there, long before max_iter, and the warning gives the floor."""
    M = 10 * torch.randn(2, 50, 60, generator=torch.Generator().manual_seed(0))[:1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, info = ddn.sinkhorn(M, gamma=1000.0, tol=1e-6, max_iter=20_000, return_info=True)
    assert not info.converged.any() and info.extra["stalled"].all()
    assert int(info.iterations) < 5000
    (w,) = [x for x in caught if issubclass(x.category, ddn.ConvergenceWarning)]
    floor = f"{float(info.residual):.3g}"
    assert "precision floor" in str(w.message) and floor in str(w.message)
