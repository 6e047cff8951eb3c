"""Annealing of gamma (epsilon scaling): solve at a small gamma first, then raise it stage by
stage, each stage starting from the potentials of the one before.

At large gamma (sharp plans, gamma times the spread of the costs in the hundreds) scaling
iterations from a cold start crawl: the potentials must travel far, a step bounded by the
curvature of the current kernel. A problem at gamma / 4 is solved in a fraction of the
iterations, and its potentials, rescaled, start the next stage close to its solution. The
stages before the last are solved loosely (``STAGE_TOL``); only the last meets the caller's
tolerance. Measured gains and the choice of constants: docs/benchmarks/ot/unbalanced/README.md.

Nothing here is specific to either problem: a stage is any solver that takes a start (log
potentials f, g with P = exp(f (+) g - gamma M) up to fixed factors). The unbalanced solver
runs one schedule for the batch (:func:`run_stages`); the balanced one (ot/annealed.py) one
per sample, so that a sample gives in a batch what it gives alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

FACTOR = 4.0
"""Ratio of consecutive stages' gamma."""

ANNEAL_ABOVE = 2000.0
"""gamma times the largest spread of the costs (max - min over the real entries of a sample)
above which the schedule is used: below it a single stage takes fewer iterations."""

START = 50.0
"""gamma times the largest spread of the costs at the first stage: a problem that the scaling
iteration solves in a few dozen iterations."""

STAGE_TOL = 1e-3
"""Residual to which the stages before the last are solved."""


def cost_spreads(M: Tensor, row_mask: Tensor, col_mask: Tensor) -> list[float]:
    """max - min of M over the real entries of each sample (host floats)."""
    if bool((row_mask > 0).all()) and bool((col_mask > 0).all()):
        return (M.amax((-2, -1)) - M.amin((-2, -1))).tolist()
    real = (row_mask.unsqueeze(-1) > 0) & (col_mask.unsqueeze(-2) > 0)
    hi = torch.where(real, M, -math.inf).amax((-2, -1))
    lo = torch.where(real, M, math.inf).amin((-2, -1))
    return (hi - lo).tolist()


def cost_spread(M: Tensor, row_mask: Tensor, col_mask: Tensor) -> float:
    """The largest max - min of M over the real entries of a sample (a host float)."""
    return max(cost_spreads(M, row_mask, col_mask))


def schedule(gamma: float, spread: float, above: float = ANNEAL_ABOVE) -> list[float]:
    """The stages' gammas, ascending and ending at ``gamma``: gamma / FACTOR^k down to the
    first at or below START / spread; just [gamma] where annealing would not pay (gamma
    times the spread at most ``above``)."""
    gammas = [gamma]
    if gamma * spread <= above:
        return gammas
    while gammas[-1] * spread > START * FACTOR:
        gammas.append(gammas[-1] / FACTOR)
    return gammas[::-1]


def warm_start(f: Tensor, g: Tensor, ratio: float) -> tuple[Tensor, Tensor]:
    """The potentials of one stage as the start of the next, whose gamma is ``ratio`` times
    as large: f = gamma alpha with alpha in units of cost, which changes little between stages.
    Padding (-inf) starts at 0, as it would cold."""
    f = torch.where(torch.isfinite(f), f * ratio, 0.0)
    g = torch.where(torch.isfinite(g), g * ratio, 0.0)
    return f, g


@dataclass
class Stage:
    """What a stage solver returns: potentials, per-sample iterations and the rest."""

    f: Tensor
    g: Tensor
    iterations: Tensor
    result: object


def run_stages(
    solve_stage: Callable[[float, float, int, tuple[Tensor, Tensor] | None], Stage],
    gammas: list[float],
    tol: float,
    max_iter: int,
) -> tuple[Stage, Tensor]:
    """Run ``solve_stage(gamma, tol, max_iter, start)`` over the schedule ``gammas``; the last
    stage and the per-sample iterations over all stages. A stage before the last may use half
    of what is left of ``max_iter`` (after the most iterations of a sample so far), so that
    the last always gets at least half; one with nothing to use is skipped."""
    previous, spent = None, None  # the last stage run and its gamma
    for k, gamma in enumerate(gammas):
        last = k == len(gammas) - 1
        budget = max_iter - (0 if spent is None else int(spent.max()))
        if not last:
            budget //= 2
            if budget < 1:
                continue
        start = None
        if previous is not None:
            start = warm_start(previous[0].f, previous[0].g, gamma / previous[1])
        stage = solve_stage(gamma, tol if last else max(tol, STAGE_TOL), budget, start)
        spent = stage.iterations if spent is None else spent + stage.iterations
        previous = (stage, gamma)
    return stage, spent
