"""Differentiable log-domain unbalanced Sinkhorn for ``backward_mode="unroll"``.

Autograd records every iteration (the logsumexp inputs, O(m n) each), which is the memory
that implicit differentiation avoids. The potentials are updated in the log domain,
f = -phi_r logsumexp_j(log c_j + g_j - gamma M_ij) (likewise g), so the recorded graph is
stable at any gamma, over-relaxed by the forward solver's adaptive schedule (a constant for
autograd) and run over the same annealing stages, so that both take about as many
iterations. Convergence is checked without gradient every ``check_every`` iterations on the
forward's residual; converged samples are frozen with ``torch.where``, and a sample whose
residual has stalled at its precision floor stops, unconverged (the caller warns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ddn_layers.base import Solved
from ddn_layers.ot import annealing
from ddn_layers.ot.schedule import OmegaSchedule
from ddn_layers.ot.unbalanced.solver import Problem, Sides, UnbalancedSolution


def _safe_log(x: Tensor, floor: float) -> Tensor:
    """log x above ``floor``, -inf (with zero gradient) on padding."""
    pos = x > floor
    return torch.where(pos, torch.where(pos, x, 1.0).log(), -math.inf)


@dataclass
class _State:
    f: Tensor  # (B, m) log potentials, recorded by autograd
    g: Tensor  # (B, n)
    active: Tensor  # (B,) bool: still iterating
    iterations: Tensor  # (B,) int64
    error: Tensor  # (B,) residual at the last check
    schedule: OmegaSchedule
    omega: Tensor  # (B, 1) the schedule's factors
    stall: list[int]  # checks in a row without improvement at the precision floor


def _step(problem: Problem, logK: Tensor, sides: Sides, state: _State, first: bool) -> None:
    """One over-relaxed iteration (row, then column update) of the active samples."""
    w, on = state.omega, state.active.unsqueeze(-1)
    f = torch.logsumexp(logK + (problem.log_c + state.g).unsqueeze(-2), dim=-1) * -sides.phi_r
    f = f if first else torch.lerp(state.f, f, w)
    state.f = torch.where(on, f, state.f)
    g = torch.logsumexp(logK + (problem.log_r + state.f).unsqueeze(-1), dim=-2) * -sides.phi_c
    g = g if first else torch.lerp(state.g, g, w)
    state.g = torch.where(on, g, state.g)


def _translate(problem: Problem, sides: Sides, state: _State) -> None:
    """The forward's translation along (f + t, g - t) (solver._translate), recorded by
    autograd: t = (log sum r~ - log sum c~) / (lam_r + lam_c) for the active samples."""
    lam = sides.lam_r + sides.lam_c
    if lam == 0:
        return
    log_a = torch.logsumexp(problem.log_r - sides.lam_r * state.f, dim=-1)
    log_c = torch.logsumexp(problem.log_c - sides.lam_c * state.g, dim=-1)
    t = torch.where(state.active, (log_a - log_c) / lam, 0.0).unsqueeze(-1)
    state.f, state.g = state.f + t, state.g - t


def _log_plan(problem: Problem, logK: Tensor, f: Tensor, g: Tensor) -> Tensor:
    return logK + (problem.log_r + f).unsqueeze(-1) + (problem.log_c + g).unsqueeze(-2)


@torch.no_grad()
def _check(problem, logK, sides, state: _State, it: int, since: int, tol: float) -> None:
    """Measure the residuals, adapt omega, and stop the converged (or stalled) samples."""
    P = _log_plan(problem, logK, state.f, state.g).exp()
    e = torch.nan_to_num(problem.residual(sides, P, state.f, state.g), nan=math.inf)
    errs, sched, on = e.tolist(), state.schedule, state.active.tolist()
    best, w_frozen = list(sched.best), list(sched.omega)
    sched.update(errs, [math.isfinite(x) for x in errs], since)
    sched.omega = [w if a else w0 for w, w0, a in zip(sched.omega, w_frozen, on, strict=True)]
    for i, (x, b) in enumerate(zip(errs, best, strict=True)):
        flat = sched.plain[i] and on[i] and not x < 0.99 * b
        state.stall[i] = state.stall[i] + 1 if flat else 0
    state.omega = sched.tensor(e).view(-1, 1)
    stalled = torch.tensor([k >= 3 for k in state.stall], device=e.device)
    state.error = torch.where(state.active, e, state.error)
    stop = state.active & ((e <= tol) | stalled)
    state.iterations = torch.where(stop, it, state.iterations)
    state.active = state.active & ~stop


def unrolled_stage(problem, gamma, sides, tol, max_iter, check_every, start) -> annealing.Stage:
    """One annealing stage, recorded by autograd: the potentials and per-sample iterations."""
    B, M = problem.M.shape[0], problem.M
    f, g = problem.start(gamma) if start is None else start  # a constant: P does not depend on it
    logK = M * (-gamma)
    schedule = OmegaSchedule(B, torch.finfo(M.dtype).eps)
    state = _State(
        f, g, torch.ones(B, dtype=torch.bool, device=M.device),
        torch.full((B,), max_iter, dtype=torch.long, device=M.device),
        torch.full((B,), math.inf, dtype=M.dtype, device=M.device),
        schedule, schedule.tensor(M).view(-1, 1), [0] * B,
    )  # fmt: skip
    last = 0
    for it in range(1, max_iter + 1):
        _step(problem, logK, sides, state, first=it == 1 and start is None)
        if it % check_every == 0 or it == max_iter:
            _check(problem, logK, sides, state, it, it - last, tol)
            last = it
            if not bool(state.active.any()):
                break
            _translate(problem, sides, state)
    return annealing.Stage(state.f, state.g, state.iterations, state)


def _final_plan(problem: Problem, logK: Tensor, sides: Sides, state: _State) -> Tensor:
    """log P from the potentials; an unconverged sample first gets one plain column update,
    so that it does not end inside an over-relaxed overshoot (where exp can overflow)."""
    if bool(state.active.any()):
        g = torch.logsumexp(logK + (problem.log_r + state.f).unsqueeze(-1), dim=-2) * -sides.phi_c
        state.g = torch.where(state.active.unsqueeze(-1), g, state.g)
    return _log_plan(problem, logK, state.f, state.g)


def unrolled_unbalanced(
    M, r, c, gamma, rho, tol, max_iter, check_every=10, anneal=True, log_plan=False
):
    """The problem of :func:`~ddn_layers.ot.unbalanced.solver.solve_unbalanced`, recorded
    by autograd; returns the solution (whose ``P`` is log P with ``log_plan``, -inf and a
    constant on padding) and the number of annealing stages."""
    floor = math.sqrt(torch.finfo(M.dtype).tiny)
    log_r, log_c = _safe_log(r, floor), _safe_log(c, floor)
    rm, cm = (r > floor).to(M.dtype), (c > floor).to(M.dtype)
    problem = Problem(M, log_r, log_c, rm, cm)
    spread = annealing.cost_spread(M.detach(), rm, cm)
    gammas = annealing.schedule(gamma, spread) if anneal else [gamma]

    def stage(gamma_k, tol_k, budget, start):
        sides = Sides.of(gamma_k, rho)
        return unrolled_stage(problem, gamma_k, sides, tol_k, budget, check_every, start)

    last, iterations = annealing.run_stages(stage, gammas, tol, max_iter)
    state, sides = last.result, Sides.of(gamma, rho)
    logP = _final_plan(problem, M * (-gamma), sides, state)
    if log_plan:
        # padding is -inf through log r, log c; the mask makes it a constant for autograd (its
        # gradient would otherwise reach the real rows' potentials through the sums)
        real = (rm.unsqueeze(-1) > 0) & (cm.unsqueeze(-2) > 0)
        P = torch.where(real, logP, -math.inf)
    else:
        P = logP.exp()
    with torch.no_grad():
        plan = P.exp() if log_plan else P
        error = torch.nan_to_num(problem.residual(sides, plan, state.f, state.g), nan=math.inf)
    omega = state.omega.view(-1).detach()
    f = torch.where(rm > 0, state.f.detach(), -math.inf)
    g = torch.where(cm > 0, state.g.detach(), -math.inf)
    sol = UnbalancedSolution(P, f, g, iterations, error, error <= tol, omega)
    return sol, len(gammas)


def solve_unrolled(opts, M: Tensor, r: Tensor, c: Tensor) -> Solved:
    """The ``unroll`` entry's solver: autograd differentiates P through the iterations."""
    sol, stages = unrolled_unbalanced(
        M, r, c, opts.gamma, opts.marginal_penalty, opts.tol, opts.max_iter,
        opts.check_every, opts.anneal, opts.log_plan,
    )  # fmt: skip
    return Solved(sol.P, (), sol.info(stages))
