"""The balanced forward over an annealing schedule of gamma, one schedule per sample.

At large gamma (gamma times the spread of the costs above ``ANNEAL_ABOVE``) a sample is solved
at gamma / 4^k first and then at each gamma up to its own, every stage warm-started from the
potentials of the one before (annealing.py), and each stage takes its Newton steps eagerly
(drift.EAGER): from a warm start the Newton step on the dual is in its quadratic regime, where
the scaling iteration's linear rate at such a gamma is far too slow. Each sample's schedule
depends on its own costs, and samples with and without a warm start are solved in separate
calls, so a sample gives in a batch exactly what it gives alone. The iterations and Newton
steps reported are those of all of a sample's stages; ``stages`` counts them.
"""

from __future__ import annotations

import math
from dataclasses import fields

import torch
from torch import Tensor

from ddn_layers.base import Solved
from ddn_layers.ot import annealing, logplan
from ddn_layers.ot.solver import SinkhornSolution, potentials_cost, solve_sinkhorn

ANNEAL_ABOVE = 500.0
"""gamma times the spread of a sample's costs above which it is annealed (the measurements
behind it: docs/benchmarks/ot/README.md, "Design notes")."""


def schedules(M: Tensor, r: Tensor, c: Tensor, gamma: float, anneal: bool) -> list[list[float]]:
    """Each sample's gammas, ascending and ending at ``gamma`` ([gamma] where it does not
    pay, or without ``anneal``)."""
    if not anneal:
        return [[gamma]] * M.shape[0]
    floor = math.sqrt(torch.finfo(M.dtype).tiny)
    spreads = annealing.cost_spreads(M, r > floor, c > floor)
    return [annealing.schedule(gamma, s, ANNEAL_ABOVE) for s in spreads]


def _merge(parts: list[tuple[list[int], SinkhornSolution]], B: int) -> SinkhornSolution:
    """The solutions of disjoint groups of samples (batch positions, solution) in batch
    order."""
    if len(parts) == 1 and parts[0][0] == list(range(B)):
        return parts[0][1]
    values = {}
    for f in fields(SinkhornSolution):
        first = getattr(parts[0][1], f.name)
        out = first.new_empty((B, *first.shape[1:]))
        for rows, sol in parts:
            out[torch.tensor(rows, device=out.device)] = getattr(sol, f.name)
        values[f.name] = out
    return SinkhornSolution(**values)


def solve_annealed(M, r, c, gamma, tol, max_iter, check_every=10, anneal=True, **kw):
    """:func:`~ddn_layers.ot.solver.solve_sinkhorn` over each sample's schedule (module
    docstring): the solution, with the iterations of all stages, and each sample's number of
    stages (B,). ``kw``: ``overrelax``. A stage before a sample's last may use half of what
    its group has left of ``max_iter`` (annealing.run_stages' rule)."""
    B = M.shape[0]
    plans = schedules(M, r, c, gamma, anneal)
    K = max(len(p) for p in plans)
    spent, newton = [0] * B, [0] * B  # iterations and Newton steps over all stages
    previous: list[float | None] = [None] * B  # the gamma of each sample's latest stage
    f, g = torch.zeros_like(r), torch.zeros_like(c)  # the potentials of that stage
    parts = []
    for k in range(K):
        last = k == K - 1
        on = [i for i in range(B) if len(plans[i]) >= K - k]
        groups = [[i for i in on if (previous[i] is not None) == warm] for warm in (False, True)]
        for warm, rows in zip((False, True), groups, strict=True):
            budget = max_iter - max((spent[i] for i in rows), default=0)
            budget = budget if last else budget // 2
            if not rows or budget < 1:
                continue
            sel = torch.tensor(rows, device=M.device)
            gamma_k = plans[rows[0]][k - (K - len(plans[rows[0]]))]
            start = None
            if warm:
                ratio = torch.tensor([gamma_k / previous[i] for i in rows], dtype=M.dtype)
                start = annealing.warm_start(f[sel], g[sel], ratio.to(M.device).unsqueeze(-1))
            # the whole batch in order (no annealing) is passed as it is: no copy of M
            Mk, rk, ck = (M, r, c) if len(rows) == B else (M[sel], r[sel], c[sel])
            sol = solve_sinkhorn(
                Mk, rk, ck, gamma_k, tol if last else max(tol, annealing.STAGE_TOL), budget,
                check_every, start=start, eager_newton=warm or not last, **kw,
            )  # fmt: skip
            f[sel], g[sel] = sol.f, sol.g
            counts = zip(rows, sol.iterations.tolist(), sol.newton.tolist(), strict=True)
            for i, its, steps in counts:
                spent[i], newton[i], previous[i] = spent[i] + its, newton[i] + steps, gamma_k
            if last:
                parts.append((rows, sol))
    sol = _merge(parts, B)
    sol.iterations = torch.tensor(spent, device=M.device)
    sol.newton = torch.tensor(newton, device=M.device)
    return sol, torch.tensor([float(len(p)) for p in plans], dtype=M.dtype, device=M.device)


def log_plan_of(sol: SinkhornSolution, M: Tensor, r: Tensor, c: Tensor, gamma: float) -> Tensor:
    """log P of a solution (logplan.py): log of the plan where it is positive, else the
    exponent f (+) g - gamma M' of its potentials (M' the reduced cost they refer to), -inf on
    padding."""
    exponent = torch.add(sol.f.unsqueeze(-1), sol.g.unsqueeze(-2))
    exponent.sub_(potentials_cost(M, r, c), alpha=gamma)
    return logplan.log_plan(sol.P, exponent)


def solve(opts, M: Tensor, r: Tensor, c: Tensor) -> Solved:
    """The layer's solver (``LayerSpec.solve``): P (or log P), saved for the backward, and
    its record."""
    sol, stages = solve_annealed(M, r, c, opts.gamma, opts.tol, opts.max_iter, opts.check_every)
    y = log_plan_of(sol, M, r, c, opts.gamma) if opts.log_plan else sol.P
    return Solved(y, (y,), sol.info(stages))
