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
from ddn_layers.ot.schedule import OmegaSchedule, backed_off
from ddn_layers.ot.solver import SinkhornSolution


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


def _step(p: _Problem, s: _State, first: bool) -> None:
    """One over-relaxed log-domain iteration (row, then column update) of the active samples."""
    w = s.omega.view(-1, 1)
    f_new = p.log_r - torch.logsumexp(p.logK + s.g.unsqueeze(-2), dim=-1)
    f_new = torch.where(p.row_mask, f_new if first else (1 - w) * s.f + w * f_new, -math.inf)
    g_new = p.log_c - torch.logsumexp(p.logK + f_new.unsqueeze(-1), dim=-2)
    g_new = torch.where(p.col_mask, g_new if first else (1 - w) * s.g + w * g_new, -math.inf)
    s.f = torch.where(s.active.unsqueeze(-1), f_new, s.f)
    s.g = torch.where(s.active.unsqueeze(-1), g_new, s.g)


def _marginal_error(p: _Problem, f: Tensor, g: Tensor) -> Tensor:
    logP = p.logK + f.unsqueeze(-1) + g.unsqueeze(-2)
    row = torch.where(p.row_mask, torch.logsumexp(logP, dim=-1).exp(), 0.0)
    col = torch.where(p.col_mask, torch.logsumexp(logP, dim=-2).exp(), 0.0)
    return (row - p.r).abs().sum(-1) + (col - p.c).abs().sum(-1)


def _adapt_omega(s: _State, errs: list[float], it: int, like: Tensor) -> Tensor:
    """Update the factors from the errors ``errs``; the samples stalled at their floor (B,).

    A sample settled at its precision floor (see OmegaSchedule) whose error no longer
    improves cannot reach tol, and every further iteration would only grow the recorded
    graph: after three such checks it stops, unconverged (the caller warns). An over-relaxed
    error that has not improved on its best for two checks in a row backs off as a blow-up
    does, since an iteration swinging at a large factor can overflow the gradient through it;
    this rule is not in OmegaSchedule, where it would also catch the scaling iteration's
    float32 errors that hover just above the precision floor.
    """
    sched, on = s.schedule, s.active.tolist()
    w_frozen, best = list(sched.omega), list(sched.best)
    sched.update(errs, [math.isfinite(x) for x in errs], it - s.last_check)
    # frozen samples keep the factor they converged with
    sched.omega = [w if a else w0 for w, w0, a in zip(sched.omega, w_frozen, on, strict=True)]
    for i, (x, b) in enumerate(zip(errs, best, strict=True)):
        flat = sched.plain[i] and on[i] and not x < 0.99 * b
        s.stall[i] = s.stall[i] + 1 if flat else 0
        s.stuck[i] = s.stuck[i] + 1 if on[i] and not x < b else 0
        if s.stuck[i] >= 2 and sched.omega[i] > 1.0:
            sched.omega[i], sched.mu2[i] = backed_off(sched.omega[i], sched.mu2[i])
            s.stuck[i] = 0
    s.omega = sched.tensor(like)
    return torch.tensor([k >= 3 for k in s.stall], device=like.device)


@torch.no_grad()
def _check(p: _Problem, s: _State, it: int, overrelax: bool, like: Tensor) -> None:
    """Measure the errors, adapt omega, and stop the converged (or stalled) samples."""
    e = _marginal_error(p, s.f, s.g)
    stalled = _adapt_omega(s, e.tolist(), it, like) if overrelax else None
    s.last_check = it
    s.error = torch.where(s.active, e, s.error)
    if stalled is not None:
        s.iterations = torch.where(s.active & stalled & (e > p.tol), it, s.iterations)
        s.active = s.active & ~(stalled & (e > p.tol))
    newly = s.active & (e <= p.tol)
    s.iterations = torch.where(newly, it, s.iterations)
    s.active = s.active & ~newly


def _final_plan(p: _Problem, s: _State) -> Tensor:
    """P from the potentials; an unconverged sample first gets one plain column update.

    An unconverged sample may end inside an over-relaxed overshoot, where f + g is large
    enough for exp to overflow; the plain column update makes every column of P sum to its
    marginal (P finite), and its error is measured again.
    """
    unfinished = bool(s.active.any())
    if unfinished:
        g_plain = p.log_c - torch.logsumexp(p.logK + s.f.unsqueeze(-1), dim=-2)
        s.g = torch.where(s.active.unsqueeze(-1) & p.col_mask, g_plain, s.g)
    P = torch.exp(p.logK + s.f.unsqueeze(-1) + s.g.unsqueeze(-2))
    if unfinished:
        with torch.no_grad():
            e = (P.sum(-1) - p.r).abs().sum(-1) + (P.sum(-2) - p.c).abs().sum(-1)
            s.error = torch.where(s.active, e, s.error)
    return P


def _start(M: Tensor, r: Tensor, c: Tensor, gamma: float, tol: float, max_iter: int):
    B = M.shape[0]
    row_mask, col_mask = r > 0, c > 0
    logK = torch.where(row_mask.unsqueeze(-1) & col_mask.unsqueeze(-2), M * (-gamma), 0.0)
    p = _Problem(r, c, row_mask, col_mask, _safe_log(r), _safe_log(c), logK, tol)
    schedule = OmegaSchedule(B, torch.finfo(M.dtype).eps)
    s = _State(
        f=torch.zeros_like(r),
        g=torch.where(col_mask, torch.zeros_like(c), -math.inf),
        active=torch.ones(B, dtype=torch.bool, device=M.device),
        iterations=torch.full((B,), max_iter, dtype=torch.long, device=M.device),
        error=torch.full((B,), math.inf, dtype=M.dtype, device=M.device),
        schedule=schedule,
        omega=schedule.tensor(M),
        stall=[0] * B,
        stuck=[0] * B,
    )
    return p, s


def unrolled_sinkhorn(
    M: Tensor,
    r: Tensor,
    c: Tensor,
    gamma: float,
    tol: float,
    max_iter: int,
    check_every: int = 10,
    overrelax: bool = True,
) -> SinkhornSolution:
    """The problem of :func:`~ddn_layers.ot.solver.solve_sinkhorn`, recorded by autograd."""
    p, s = _start(M, r, c, gamma, tol, max_iter)
    for it in range(1, max_iter + 1):
        _step(p, s, first=it == 1)
        if it % check_every == 0 or it == max_iter:
            _check(p, s, it, overrelax, M)
            if not bool(s.active.any()):
                break
    P = _final_plan(p, s)
    rate = torch.tensor(s.schedule.mu2, dtype=M.dtype, device=M.device)
    converged = ~s.active & (s.error <= tol)  # a stalled sample stopped unconverged
    omega = s.omega.view(M.shape[0])
    return SinkhornSolution(
        P, s.f.detach(), s.g.detach(), s.iterations, s.error, converged, omega, rate
    )


def solve_unrolled(opts, M: Tensor, r: Tensor, c: Tensor) -> Solved:
    """The ``unroll`` entry's solver: autograd differentiates P through the iterations."""
    sol = unrolled_sinkhorn(M, r, c, opts.gamma, opts.tol, opts.max_iter, opts.check_every)
    return Solved(sol.P, (), sol.info())
