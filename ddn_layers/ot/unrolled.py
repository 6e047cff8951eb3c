"""Differentiable log-domain Sinkhorn for ``backward_mode="unroll"``.

Autograd records every iteration: each stores O(m n) intermediates (the logsumexp inputs),
which is the memory cost that implicit differentiation avoids. The potentials are updated in
the log domain so the unrolled graph is stable at any gamma. Convergence is checked, without
gradient, every ``check_every`` iterations; converged samples are frozen with ``torch.where``.
The over-relaxation factor is adapted exactly as in the forward solver (it is a constant for
autograd), so both modes run about the same number of iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ddn_layers.base import Solved
from ddn_layers.ot import drift
from ddn_layers.ot.schedule import OmegaSchedule, backed_off
from ddn_layers.ot.solver import LIMITS, SinkhornSolution


def _safe_log(x: Tensor) -> Tensor:
    """log x on positive entries, -inf (with zero gradient) on padding."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, 1.0).log(), -math.inf)


@dataclass
class _Problem:
    r: Tensor
    c: Tensor
    row_mask: Tensor  # bool, (B, m)
    col_mask: Tensor
    log_r: Tensor
    log_c: Tensor
    # Padded rows/columns of the log-kernel are 0 (finite) so that logsumexp never sees an
    # all -inf slice; the potentials there are -inf, which zeroes those rows/columns of P.
    logK: Tensor
    tol: float


@dataclass
class _State:
    f: Tensor  # (B, m) log potentials, recorded by autograd
    g: Tensor  # (B, n)
    active: Tensor  # (B,) bool: still iterating
    iterations: Tensor  # (B,) int64
    error: Tensor  # (B,) marginal error at the last check
    schedule: OmegaSchedule
    omega: Tensor  # (B, 1, 1) the schedule's factors
    last_check: int = 0
    stall: list[int] | None = None  # checks in a row without improvement at the precision floor
    stuck: list[int] | None = None  # checks in a row without improvement, over-relaxed
    watch: drift.DriftWatch | None = None  # when a sample's error has stopped improving
    newton: list[int] | None = None  # Newton steps taken per sample


def _step(problem: _Problem, state: _State, first: bool) -> None:
    """One over-relaxed log-domain iteration (row, then column update) of the active samples."""
    w = state.omega.view(-1, 1)
    f_new = problem.log_r - torch.logsumexp(problem.logK + state.g.unsqueeze(-2), dim=-1)
    f_new = torch.where(
        problem.row_mask, f_new if first else (1 - w) * state.f + w * f_new, -math.inf
    )
    g_new = problem.log_c - torch.logsumexp(problem.logK + f_new.unsqueeze(-1), dim=-2)
    g_new = torch.where(
        problem.col_mask, g_new if first else (1 - w) * state.g + w * g_new, -math.inf
    )
    state.f = torch.where(state.active.unsqueeze(-1), f_new, state.f)
    state.g = torch.where(state.active.unsqueeze(-1), g_new, state.g)


def _marginal_error(problem: _Problem, f: Tensor, g: Tensor) -> Tensor:
    logP = problem.logK + f.unsqueeze(-1) + g.unsqueeze(-2)
    row = torch.where(problem.row_mask, torch.logsumexp(logP, dim=-1).exp(), 0.0)
    col = torch.where(problem.col_mask, torch.logsumexp(logP, dim=-2).exp(), 0.0)
    return (row - problem.r).abs().sum(-1) + (col - problem.c).abs().sum(-1)


def _adapt_omega(state: _State, errs: list[float], it: int, like: Tensor) -> Tensor:
    """Update the factors from the errors ``errs``; the samples stalled at their floor (B,).

    A sample settled at its precision floor (see OmegaSchedule) whose error no longer
    improves cannot reach tol, and every further iteration would only grow the recorded
    graph: after three such checks it stops, unconverged (the caller warns). An over-relaxed
    error that has not improved on its best for two checks in a row backs off as a blow-up
    does, since an iteration swinging at a large factor can overflow the gradient through it;
    this rule is not in OmegaSchedule, where it would also catch the scaling iteration's
    float32 errors that hover just above the precision floor.
    """
    sched, on = state.schedule, state.active.tolist()
    w_frozen, best = list(sched.omega), list(sched.best)
    sched.update(errs, [math.isfinite(x) for x in errs], it - state.last_check)
    # frozen samples keep the factor they converged with
    sched.omega = [w if a else w0 for w, w0, a in zip(sched.omega, w_frozen, on, strict=True)]
    for i, (x, b) in enumerate(zip(errs, best, strict=True)):
        flat = sched.plain[i] and on[i] and not x < 0.99 * b
        state.stall[i] = state.stall[i] + 1 if flat else 0
        state.stuck[i] = state.stuck[i] + 1 if on[i] and not x < b else 0
        if state.stuck[i] >= 2 and sched.omega[i] > 1.0:
            sched.omega[i], sched.mu2[i] = backed_off(sched.omega[i], sched.mu2[i])
            state.stuck[i] = 0
    state.omega = sched.tensor(like)
    return torch.tensor([k >= 3 for k in state.stall], device=like.device)


@torch.no_grad()
def _check(problem: _Problem, state: _State, it: int, overrelax: bool, like: Tensor) -> None:
    """Measure the errors, adapt omega, and stop the converged (or stalled) samples."""
    e = _marginal_error(problem, state.f, state.g)
    stalled = _adapt_omega(state, e.tolist(), it, like) if overrelax else None
    state.last_check = it
    state.error = torch.where(state.active, e, state.error)
    if stalled is not None:
        state.iterations = torch.where(
            state.active & stalled & (e > problem.tol), it, state.iterations
        )
        state.active = state.active & ~(stalled & (e > problem.tol))
    newly = state.active & (e <= problem.tol)
    state.iterations = torch.where(newly, it, state.iterations)
    state.active = state.active & ~newly


def _newton_jumps(problem: _Problem, state: _State, like: Tensor) -> None:
    """The forward's remedy for a crawl (see drift.py): a Newton step on the dual for each
    active sample whose error has stopped improving. The new potentials are a fresh start for
    autograd (detached): the gradient is then that of the iterations after the last step, which
    converges to the solution's as those do, while the crawl before it is not recorded."""
    with torch.no_grad():
        on = state.active.tolist()
        due = [i for i in state.watch.observe(state.error.tolist()) if on[i]]
        if not due:
            return
        f, g, steps, df, dg = _newton_steps(problem, state, due)
        jumped = [i for i, s in zip(due, steps, strict=True) if s > 0]
        state.watch.settle(due, jumped)
        if not jumped:
            return
        at = [due.index(i) for i in jumped]
        s = torch.tensor([steps[k] for k in at], dtype=f.dtype, device=f.device).unsqueeze(-1)
        rows = torch.tensor(jumped, device=f.device)
        f_new = state.f.detach().index_copy(0, rows, f[at] + s * df[at])
        g_new = state.g.detach().index_copy(0, rows, g[at] + s * dg[at])
        moved = torch.zeros_like(state.active).index_fill_(0, rows, True).unsqueeze(-1)
    state.f = torch.where(moved, f_new, state.f)
    state.g = torch.where(moved, g_new, state.g)
    for i in jumped:
        state.schedule.reset(i)
        state.stall[i] = state.stuck[i] = 0
        state.newton[i] += 1
    state.omega = state.schedule.tensor(like)


def _newton_steps(problem: _Problem, state: _State, due: list[int]):
    """The potentials of the samples at ``due``, their Newton directions and the steps along
    them (drift.py), on the kernel exp(log K + f (+) g)."""
    sel = torch.tensor(due, device=state.f.device)
    f, g = state.f.detach()[sel], state.g.detach()[sel]
    logK, r, c = problem.logK[sel], problem.r[sel], problem.c[sel]
    rows, cols = problem.row_mask[sel], problem.col_mask[sel]
    df, dg = drift.newton_direction((logK + f.unsqueeze(-1) + g.unsqueeze(-2)).exp(), r, c)
    df, dg = torch.where(rows, df, 0.0), torch.where(cols, dg, 0.0)
    masks, padded = (rows.to(f.dtype), cols.to(f.dtype)), not bool(rows.all() & cols.all())
    lo = LIMITS.get(f.dtype, LIMITS[torch.float32])[0]

    def slope_at(idx: list[int], steps: list[float]) -> list[float]:
        at = torch.tensor(idx, device=f.device)
        s = torch.tensor(steps, dtype=f.dtype, device=f.device)
        # -log K with gamma 1 is the cost gamma M the kernel is built from
        return drift.dual_slopes(
            -logK[at], 1.0, f[at], g[at], df[at], dg[at], r[at], c[at],
            (masks[0][at], masks[1][at]), lo, padded, s,
        )  # fmt: skip

    return f, g, drift.step_lengths(slope_at, drift.first_steps(df, dg)), df, dg


def _final_plan(problem: _Problem, state: _State, log_plan: bool) -> Tensor:
    """P (or log P) from the potentials; an unconverged sample first gets one plain column
    update.

    An unconverged sample may end inside an over-relaxed overshoot, where f + g is large
    enough for exp to overflow; the plain column update makes every column of P sum to its
    marginal (P finite), and its error is measured again.
    """
    unfinished = bool(state.active.any())
    if unfinished:
        g_plain = problem.log_c - torch.logsumexp(problem.logK + state.f.unsqueeze(-1), dim=-2)
        state.g = torch.where(state.active.unsqueeze(-1) & problem.col_mask, g_plain, state.g)
    logP = problem.logK + state.f.unsqueeze(-1) + state.g.unsqueeze(-2)
    P = None if log_plan else torch.exp(logP)
    if unfinished:
        with torch.no_grad():
            Q = logP.exp() if P is None else P
            e = (Q.sum(-1) - problem.r).abs().sum(-1) + (Q.sum(-2) - problem.c).abs().sum(-1)
            state.error = torch.where(state.active, e, state.error)
    if P is not None:
        return P
    # padding is -inf through the potentials; the mask makes it a constant for autograd (its
    # gradient would otherwise reach the real rows' potentials through the sums)
    real = problem.row_mask.unsqueeze(-1) & problem.col_mask.unsqueeze(-2)
    return torch.where(real, logP, -math.inf)


def _start(M: Tensor, r: Tensor, c: Tensor, gamma: float, tol: float, max_iter: int):
    B = M.shape[0]
    row_mask, col_mask = r > 0, c > 0
    logK = torch.where(row_mask.unsqueeze(-1) & col_mask.unsqueeze(-2), M * (-gamma), 0.0)
    problem = _Problem(r, c, row_mask, col_mask, _safe_log(r), _safe_log(c), logK, tol)
    schedule = OmegaSchedule(B, torch.finfo(M.dtype).eps)
    state = _State(
        f=torch.zeros_like(r),
        g=torch.where(col_mask, torch.zeros_like(c), -math.inf),
        active=torch.ones(B, dtype=torch.bool, device=M.device),
        iterations=torch.full((B,), max_iter, dtype=torch.long, device=M.device),
        error=torch.full((B,), math.inf, dtype=M.dtype, device=M.device),
        schedule=schedule,
        omega=schedule.tensor(M),
        stall=[0] * B,
        stuck=[0] * B,
        watch=drift.DriftWatch(B, schedule.floor),
        newton=[0] * B,
    )
    return problem, state


def unrolled_sinkhorn(
    M: Tensor,
    r: Tensor,
    c: Tensor,
    gamma: float,
    tol: float,
    max_iter: int,
    check_every: int = 10,
    overrelax: bool = True,
    log_plan: bool = False,
) -> SinkhornSolution:
    """The problem of :func:`~ddn_layers.ot.solver.solve_sinkhorn`, recorded by autograd;
    with ``log_plan`` the solution's ``P`` holds log P (-inf on padding, a constant there)."""
    problem, state = _start(M, r, c, gamma, tol, max_iter)
    for it in range(1, max_iter + 1):
        _step(problem, state, first=it == 1)
        if it % check_every == 0 or it == max_iter:
            _check(problem, state, it, overrelax, M)
            if not bool(state.active.any()):
                break
            _newton_jumps(problem, state, M)
    P = _final_plan(problem, state, log_plan)
    rate = torch.tensor(state.schedule.mu2, dtype=M.dtype, device=M.device)
    converged = ~state.active & (state.error <= tol)  # a stalled sample stopped unconverged
    omega = state.omega.view(M.shape[0])
    stalled = ~converged & (state.iterations < max_iter)
    f, g = state.f.detach(), state.g.detach()
    newton = torch.tensor(state.newton, device=M.device)
    return SinkhornSolution(
        P, f, g, state.iterations, state.error, converged, omega, rate, stalled, newton
    )


def solve_unrolled(opts, M: Tensor, r: Tensor, c: Tensor) -> Solved:
    """The ``unroll`` entry's solver: autograd differentiates P through the iterations."""
    sol = unrolled_sinkhorn(
        M, r, c, opts.gamma, opts.tol, opts.max_iter, opts.check_every, log_plan=opts.log_plan
    )
    return Solved(sol.P, (), sol.info())
