"""Newton jumps of the dual potentials: the forward solver's remedy for a crawl.

A cost far below the rest of its row and column (an outlier) can make Sinkhorn crawl. When the
potentials start on the wrong side of the outlier (the row's potential takes it where the
column's should, because the row's marginal exceeds the column's), each iteration moves that
row potential up and that column potential down by about log(r_i / c_j) while the marginal
error stays put, until they have moved by about gamma times the outlier: thousands of
iterations. Along that path the dual objective

    D(f, g) = <f, r> + <g, c> - sum_ij exp(f_i + g_j - gamma M_ij)

is nearly linear (the entries that would bend it are far below the flush threshold), and
coordinate ascent takes steps bounded by the curvature of the one entry it sees. Which side is
wrong depends on the marginals, so no choice of start or of update order avoids it, and large
gamma gives ordinary costs the same long flat stretches.

The remedy watches each sample's error. One that has not improved on its best by 1% for
``PATIENCE`` checks, above the precision floor, takes a Newton step on D: its Hessian is the
KKT matrix [[diag(P 1), P], [P^T, diag(P^T 1)]] of the backward (schur.py), whose tiny
curvature along the crawl gives a long step, far too long in fact: D is not quadratic there.
A line search along it (up or down from the full step, or from a move of ``TRUST`` where that
is shorter, on the sign of D's slope, then bisection) makes the step an ascent to near the
maximum along that line; the sample then resumes its Sinkhorn iterations from there. Where no
step ascends, the patience doubles.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ddn_layers.ot import blocks, schur

PATIENCE = 10
"""Checks without a 1% improvement on the best error before a sample takes a Newton step."""

TRUST = 10.0
"""The largest move of a potential at the first step tried: where the dual is far from
quadratic (a crawl) the Newton step is limited only by the tiny curvature it sees, and can
overshoot by many orders of magnitude."""

SEARCH_FACTOR = 4.0
"""The factor between the steps tried while bracketing the maximum."""

SEARCH_RANGE = 16
"""Steps tried upwards and downwards from the first: a crawl of gamma times an outlier of 1e4
or more, from a first step that moves by ``TRUST``, is bracketed within 4^16."""

BISECTIONS = 6
"""Bisection steps after the search has bracketed the maximum."""


EAGER = (0.5, 3)
"""(improvement factor, patience) of the eager watch (``DriftWatch(eager=True)``): a step
wherever the error has not halved in 3 checks. The stages of an annealed solve use it: they
start near their solution, where the Newton step is in its quadratic regime, and at the
gamma that needs annealing the scaling iteration's linear rate is too slow to finish."""


class DriftWatch:
    """Per active sample (host lists, compacted with the batch): the best error, the checks
    since it improved by 1% (by half when ``eager``), and the patience."""

    def __init__(self, batch: int, floor: float, eager: bool = False) -> None:
        self.factor, patience = EAGER if eager else (0.99, PATIENCE)
        self.best = [math.inf] * batch
        self.waited = [0] * batch
        self.patience = [patience] * batch
        self.floor = floor  # errors below it may be rounding noise, which no step removes

    def keep(self, rows: list[int]) -> None:
        """Restrict the state to the samples at positions ``rows``."""
        for name in ("best", "waited", "patience"):
            old = getattr(self, name)
            setattr(self, name, [old[i] for i in rows])

    def observe(self, errors: list[float]) -> list[int]:
        """Record a check's errors; the positions now due for a Newton step."""
        due = []
        for i, err in enumerate(errors):
            if err < self.factor * self.best[i]:
                self.best[i], self.waited[i] = err, 0
            else:
                self.waited[i] += 1
            if self.waited[i] >= self.patience[i] and err > self.floor:
                due.append(i)
        return due

    def settle(self, due: list[int], jumped: list[int]) -> None:
        """After the steps at ``due``: wait afresh, twice as long where none was taken."""
        for i in due:
            self.waited[i] = 0
            if i not in jumped:
                self.patience[i] *= 2


def step_lengths(slope_at: Callable[[list[int], list[float]], list[float]], starts) -> list[float]:
    """For each direction, a step s > 0 towards the maximum of a concave function along it,
    from ``slope_at(indices, steps)``: its slopes there (NaN counts as past the maximum).

    From ``starts[i]``, steps up or down by factors of ``SEARCH_FACTOR`` (while the slope
    stays positive, or not) bracket the maximum within ``SEARCH_RANGE`` factors either way;
    bisection narrows it. The step returned is the largest seen with a positive slope, so the
    function increased all the way (0: none found)."""
    k = len(starts)
    lo, hi = [0.0] * k, [math.inf] * k
    for up in (True, False):
        todo = [i for i in range(k) if (hi[i] == math.inf if up else lo[i] == 0.0)]
        steps = [x if up else x / SEARCH_FACTOR for x in starts]
        for _ in range(SEARCH_RANGE):
            if not todo:
                break
            for i, slope in zip(todo, slope_at(todo, [steps[i] for i in todo]), strict=True):
                lo[i], hi[i] = (steps[i], hi[i]) if slope > 0 else (lo[i], steps[i])
            todo = [i for i in todo if (hi[i] == math.inf if up else lo[i] == 0.0)]
            steps = [x * SEARCH_FACTOR if up else x / SEARCH_FACTOR for x in steps]
    todo = [i for i in range(k) if lo[i] > 0 and hi[i] < math.inf]
    for _ in range(BISECTIONS if todo else 0):
        mids = [(lo[i] + hi[i]) / 2 for i in todo]
        for i, mid, slope in zip(todo, mids, slope_at(todo, mids), strict=True):
            lo[i], hi[i] = (mid, hi[i]) if slope > 0 else (lo[i], mid)
    return lo


def first_steps(df: Tensor, dg: Tensor) -> list[float]:
    """Where the search starts: the full Newton step, or one that moves no potential by more
    than ``TRUST`` (in units of gamma M) where that is shorter."""
    size = torch.maximum(df.abs().amax(-1), dg.abs().amax(-1))
    return torch.clamp(TRUST / size, max=1.0).nan_to_num_(nan=0.0).tolist()


def newton_direction(P: Tensor, r: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """The Newton direction (df, dg) of D at the plan P (k, m, n) for the marginals r, c:
    H [df; dg] = [r - P 1; c - P^T 1] with H the KKT matrix of P's own marginals, solved
    directly on the smaller side (a singular H gets the ridge of the backward)."""
    rows, cols = P.sum(-1), P.sum(-2)
    transpose = P.shape[-2] < P.shape[-1]
    if transpose:
        P, r, c, rows, cols = P.mT, c, r, cols, rows
    scratch = torch.empty_like(P)
    df, dg, _, _ = schur.solve_column_side(P, rows, cols, r - rows, c - cols, scratch, "cholesky")
    return (dg, df) if transpose else (df, dg)


def dual_slopes(M, gamma, f, g, df, dg, r, c, masks, lo: float, padded: bool, steps):
    """The slope of D along (df, dg) at f + s df, g + s dg, one step s per sample (a (k,)
    tensor): <df, r - P 1> + <dg, c - P^T 1> with P = exp(f' (+) g' - gamma M) (host floats).
    ``masks``: the row and column masks (padding has zero potentials and direction)."""
    s = steps.unsqueeze(-1)
    K = blocks.kernel(M, gamma, f + s * df, g + s * dg, *masks, lo, padded)
    slope = (df * (r - K.sum(-1))).sum(-1) + (dg * (c - K.sum(-2))).sum(-1)
    return slope.tolist()
