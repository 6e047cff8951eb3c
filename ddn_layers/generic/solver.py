"""The forward of a generic node: y from the user's solver or the default Newton-CG, then the
optimality conditions checked at y and the Lagrange multipliers that the backward needs.

The default solver, for unconstrained nodes, is batched, line-searched Newton-CG. Per sample:
a Newton step from conjugate gradients on Hessian-vector products (truncated at the forcing
tolerance min(1/2, sqrt(relative gradient)) for superlinear convergence without over-solving
early steps, and at negative curvature, where the last iterate, or the steepest descent
direction if there is none, is still a descent direction), then a backtracking Armijo line
search. Samples stop one by one when ||grad f||_inf <= tol (1 + ||grad f(y0)||_inf) and are
then held fixed. Nothing here needs autograd outside torch.func, so the forward runs under
``torch.no_grad``; with grad enabled (``unroll``) the same iterations are differentiable, step
lengths excepted (they are piecewise constant).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.func import grad

from ddn_layers.base import Solved, SolverInfo
from ddn_layers.checks import ConvergenceWarning
from ddn_layers.generic.diagnostics import Diagnostics, warn_ill_posed
from ddn_layers.generic.kkt import multipliers
from ddn_layers.generic.options import ArgminCall
from ddn_layers.generic.problem import (
    Bound,
    check_constraint_value,
    check_objective_value,
    check_solution,
)
from ddn_layers.linalg import conjugate_gradient

ARMIJO_C = 1e-4
MAX_HALVINGS = 40
NOISE = 1e3
"""A predicted decrease below NOISE * eps * |f| is lost in the rounding of f itself."""


def _line_search(bound: Bound, y: Tensor, d: Tensor, f0: Tensor, slope: Tensor, skip: Tensor):
    """Step t per sample with f(y + t d) <= f(y) + c t slope; and whether one was found within
    MAX_HALVINGS halvings. Samples in ``skip`` take t = 1 unchecked."""
    t = torch.ones_like(f0)
    ok = skip.clone()
    with torch.no_grad():
        for _ in range(MAX_HALVINGS):
            if bool(ok.all()):
                break
            f_try = bound.f(y + t[:, None] * d)
            ok = ok | (torch.isfinite(f_try) & (f_try <= f0 + ARMIJO_C * t * slope))
            t = torch.where(ok, t, 0.5 * t)
    return t, ok


def newton_cg(bound: Bound, y0: Tensor, opts: ArgminCall) -> tuple[Tensor, SolverInfo]:
    """Minimise the objective from y0 (B, m); returns y and its per-sample record.

    Near the minimum the decrease a Newton step predicts drops below the rounding error of
    f, and comparing values of f decides nothing. There the full step is taken if it does
    not increase the gradient norm (Newton steps shrink it quadratically), and a sample
    whose step would is at its rounding floor: it stops, converged only if within tol.
    """
    eps = torch.finfo(y0.dtype).eps
    y = y0
    g, hvp = bound.hvp(y, None)
    gnorm = g.detach().abs().amax(-1)
    scale = 1.0 + gnorm
    threshold = opts.tol * scale
    active = gnorm > threshold
    iterations = torch.zeros(bound.B, dtype=torch.long, device=y.device)
    for k in range(opts.max_iter):
        if k % opts.check_every == 0 and not bool(active.any()):
            break
        eta = torch.sqrt(gnorm / scale).clamp(max=0.1)
        res = conjugate_gradient(
            hvp, -g, rtol=eta, max_iter=opts.cg_iters(bound.m), check_every=opts.check_every
        )
        d = res.x
        slope = (g.detach() * d.detach()).sum(-1)
        # no usable Newton direction: CG met negative curvature before its first step
        fallback = (slope >= 0)[:, None]
        d = torch.where(fallback, -g, d)
        slope = torch.where(fallback[:, 0], -(g.detach() ** 2).sum(-1), slope)
        with torch.no_grad():
            f0 = bound.f(y.detach())
        noise = slope.abs() <= NOISE * eps * f0.abs()
        t, ok = _line_search(bound, y.detach(), d.detach(), f0, slope, skip=noise)
        step = active & ok
        y_new = torch.where(step[:, None], y + t[:, None] * d, y)
        g_new, hvp_new = bound.hvp(y_new, None)
        gnorm_new = g_new.detach().abs().amax(-1)
        floor = step & noise & (gnorm_new > gnorm)
        if bool(floor.any()):
            y_new = torch.where(floor[:, None], y, y_new)
            g_new, hvp_new = bound.hvp(y_new, None)
            gnorm_new = g_new.detach().abs().amax(-1)
        y, g, hvp, gnorm = y_new, g_new, hvp_new, gnorm_new
        moved = step & ~floor
        iterations = iterations + moved.long()
        # a failed line search, or the rounding floor, leaves the sample where it is: it stops
        active = moved & (gnorm > threshold)
    return y, SolverInfo(iterations, gnorm / scale, gnorm <= threshold)


def solve(call: ArgminCall, *xs: Tensor) -> Solved:
    """y, checked against the optimality conditions; saves y, the multipliers and the inputs."""
    y, info = _first_solve(call, xs)
    lam, info, diag = _optimality(call, xs, y, info, call.check_leaves)
    _warn_forward(call, info, diag)
    return Solved(y, (y, lam, *xs), info)


def unrolled_solve(call: ArgminCall, *xs: Tensor) -> Solved:
    """The same solve, run where autograd records it (``unroll``): y carries the graph."""
    y, info = _first_solve(call, xs)
    if call.check_leaves and any(x.requires_grad for x in xs) and not y.requires_grad:
        raise ValueError(
            "backward_mode='unroll' differentiates through the solver, but its y does not "
            "require grad (the solver detaches, runs under no_grad, or leaves torch): use "
            "another backward mode, or a differentiable solver"
        )
    # the check must not see the unrolled graph: hidden leaves are fine under unroll
    _, info, diag = _optimality(call, xs, y, info, check_leaves=False)
    _warn_forward(call, info, diag)
    return Solved(y, (), info)


def _first_solve(call: ArgminCall, xs: Sequence[Tensor]) -> tuple[Tensor, SolverInfo | None]:
    """y from the user's solver, or from Newton-CG started at the user's init."""
    problem = call.problem
    B = xs[0].shape[0]
    dtype = next(x.dtype for x in xs if x.is_floating_point())
    if problem.solver is not None:
        out = problem.solver(*xs)
        info = None
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], SolverInfo):
            out, info = out
        return check_solution(out, B, "solver").to(dtype), info
    y0 = check_solution(problem.init(*xs), B, "init").to(dtype)
    bound = Bound(problem, xs, y0.shape)
    check_objective_value(bound.f(y0.reshape(B, -1)), B)
    y, info = newton_cg(bound, y0.reshape(B, -1), call)
    return y.reshape(y0.shape), info


def _no_hidden_leaf(value: Tensor, what: str) -> None:
    if value.requires_grad:
        raise ValueError(
            f"the {what} depends on a tensor that requires grad but is not an input of the "
            "node (a parameter it closes over?): the implicit backward returns gradients to "
            "the inputs only, so pass that tensor as an input, e.g. node(x, alpha.expand(B))"
        )


def _checked_values(
    call: ArgminCall, bound: Bound, y: Tensor, check_leaves: bool
) -> tuple[Tensor, Tensor | None]:
    """The objective (B,) and constraints (B, p) at y, their shapes checked; with
    ``check_leaves``, evaluated under autograd to find a hidden tensor that requires grad."""
    B = bound.B
    with torch.enable_grad():
        value = check_objective_value(bound.f(y.reshape(B, -1)), B)
        h = None
        if call.problem.constrained:
            # shape checked before Bound.h reshapes it
            h = check_constraint_value(call.problem.constraints(*bound.xs, y), B)
    if check_leaves:
        _no_hidden_leaf(value, "objective")
        if h is not None:
            _no_hidden_leaf(h, "constraints")
    return value, h


def _optimality(
    call: ArgminCall,
    xs: Sequence[Tensor],
    y: Tensor,
    info: SolverInfo | None,
    check_leaves: bool,
) -> tuple[Tensor | None, SolverInfo, Diagnostics]:
    """Check what the user's functions return at y, get the multipliers, and measure the KKT
    residual: stationarity ||grad f - A^T lam||_inf / (1 + ||grad f||_inf) and feasibility
    ||h||_inf. A user solver's samples count as converged when both are within kkt_tol."""
    B = y.shape[0]
    y = y.detach()
    bound = Bound(call.problem, [x.detach() for x in xs], y.shape)
    value, h = _checked_values(call, bound, y, check_leaves)
    yf = y.reshape(B, -1)
    g = grad(lambda u: bound.f(u).sum())(yf)
    diag = Diagnostics(B, y.device)
    lam, stat = (None, g) if h is None else multipliers(bound, yf, g, call, diag)
    stationarity = stat.abs().amax(-1) / (1.0 + g.abs().amax(-1))
    extra = {"objective": value.detach(), "stationarity": stationarity}
    residual = stationarity
    if h is not None:
        feasibility = h.detach().abs().amax(-1)
        extra["feasibility"] = feasibility
        residual = torch.maximum(residual, feasibility)
    if call.problem.solver is None:
        # Newton-CG's own stopping rule decides; its residual is the relative gradient
        info.extra.update(extra)
        return lam, info, diag
    converged = residual <= call.kkt_tol
    iterations = torch.zeros(B, dtype=torch.long, device=y.device)
    if info is not None:
        converged = converged & info.converged.to(converged.device)
        iterations = info.iterations
        extra = {**info.extra, **extra}
    return lam, SolverInfo(iterations, residual, converged, extra), diag


def _warn_forward(call: ArgminCall, info: SolverInfo, diag: Diagnostics) -> None:
    """A solve that missed its tolerance, then constraints found rank deficient at y."""
    if not call.warn:
        return
    bad = ~info.converged
    n_bad = int(bad.sum())
    if n_bad:
        worst = float(info.residual[bad].max())
        if call.problem.solver is None:
            msg = (
                f"argmin: Newton-CG did not reach tol={call.tol:g} within max_iter="
                f"{call.max_iter} for {n_bad} of {bad.numel()} sample(s) (largest relative "
                f"gradient {worst:.3g}); raise max_iter, or start closer (init)"
            )
        else:
            msg = (
                f"argmin: the solver's y misses the optimality conditions for {n_bad} of "
                f"{bad.numel()} sample(s): KKT residual up to {worst:.3g} > kkt_tol="
                f"{call.kkt_tol:g} (or the solver reported no convergence); the gradient is "
                "then that of a point that is not a solution"
            )
        warnings.warn(msg, ConvergenceWarning, stacklevel=3)
    if bool(diag.rank_deficient.any()):
        warn_ill_posed(diag, call)
