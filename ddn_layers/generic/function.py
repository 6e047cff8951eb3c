"""The forward solve, its optimality check, and the autograd.Function that picks a backward."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad

from ddn_layers.base import SolverInfo
from ddn_layers.checks import ConvergenceWarning, IllConditionedWarning
from ddn_layers.generic.dense import full_grads
from ddn_layers.generic.implicit import approx_grads, implicit_grads, reads
from ddn_layers.generic.kkt import Diagnostics, multipliers
from ddn_layers.generic.options import Options
from ddn_layers.generic.problem import (
    Bound,
    Problem,
    check_constraint_value,
    check_objective_value,
    check_solution,
)
from ddn_layers.generic.solvers import newton_cg
from ddn_layers.modes import BackwardMode, first_derivatives_only

_BACKWARDS = {
    BackwardMode.IMPLICIT: implicit_grads,
    BackwardMode.FULL: full_grads,
    BackwardMode.APPROX: approx_grads,
}


def _solve(problem: Problem, xs: Sequence[Tensor], opts: Options, B: int, dtype):
    """y from the user's solver, or from Newton-CG started at the user's init."""
    if problem.solver is not None:
        out = problem.solver(*xs)
        info = None
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], SolverInfo):
            out, info = out
        return check_solution(out, B, "solver").to(dtype), info
    y0 = check_solution(problem.init(*xs), B, "init").to(dtype)
    bound = Bound(problem, xs, y0.shape)
    check_objective_value(bound.f(y0.reshape(B, -1)), B)
    y, info = newton_cg(bound, y0.reshape(B, -1), opts)
    return y.reshape(y0.shape), info


def _no_hidden_leaf(value: Tensor, what: str) -> None:
    if value.requires_grad:
        raise ValueError(
            f"the {what} depends on a tensor that requires grad but is not an input of the "
            "node (a parameter it closes over?): the implicit backward returns gradients to "
            "the inputs only, so pass that tensor as an input, e.g. node(x, alpha.expand(B))"
        )


def _optimality(
    problem: Problem,
    xs: Sequence[Tensor],
    y: Tensor,
    info: SolverInfo | None,
    opts: Options,
    check_leaves: bool,
) -> tuple[Tensor | None, SolverInfo, Diagnostics]:
    """Check what the user's functions return at y, get the multipliers, and measure the KKT
    residual: stationarity ||grad f - A^T lam||_inf / (1 + ||grad f||_inf) and feasibility
    ||h||_inf. A user solver's samples count as converged when both are within kkt_tol."""
    B = y.shape[0]
    xs = [x.detach() for x in xs]
    y = y.detach()
    bound = Bound(problem, xs, y.shape)
    yf = y.reshape(B, -1)
    with torch.enable_grad():
        value = check_objective_value(bound.f(yf), B)
        h = None
        if problem.constrained:
            h = check_constraint_value(
                problem.constraints(*xs, y), B
            )  # shape checked before Bound.h reshapes it
    if check_leaves:
        _no_hidden_leaf(value, "objective")
        if h is not None:
            _no_hidden_leaf(h, "constraints")
    g = grad(lambda u: bound.f(u).sum())(yf)
    diag = Diagnostics(B, y.device)
    lam, stat = (None, g) if h is None else multipliers(bound, yf, g, opts, diag)
    stationarity = stat.abs().amax(-1) / (1.0 + g.abs().amax(-1))
    extra = {"objective": value.detach(), "stationarity": stationarity}
    residual = stationarity
    if h is not None:
        feasibility = h.detach().abs().amax(-1)
        extra["feasibility"] = feasibility
        residual = torch.maximum(residual, feasibility)
    if problem.solver is None:
        # Newton-CG's own stopping rule decides; its residual is the relative gradient
        info.extra.update(extra)
        return lam, info, diag
    converged = residual <= opts.kkt_tol
    iterations = torch.zeros(B, dtype=torch.long, device=y.device)
    if info is not None:
        converged = converged & info.converged.to(converged.device)
        iterations = info.iterations
        extra = {**info.extra, **extra}
    return lam, SolverInfo(iterations, residual, converged, extra), diag


def _warn_forward(problem: Problem, info: SolverInfo, opts: Options) -> None:
    bad = ~info.converged
    n_bad = int(bad.sum())
    if not n_bad or not opts.warn:
        return
    worst = float(info.residual[bad].max())
    if problem.solver is None:
        msg = (
            f"argmin: Newton-CG did not reach tol={opts.tol:g} within max_iter="
            f"{opts.max_iter} for {n_bad} of {bad.numel()} sample(s) (largest relative "
            f"gradient {worst:.3g}); raise max_iter, or start closer (init)"
        )
    else:
        msg = (
            f"argmin: the solver's y misses the optimality conditions for {n_bad} of "
            f"{bad.numel()} sample(s): KKT residual up to {worst:.3g} > kkt_tol="
            f"{opts.kkt_tol:g} (or the solver reported no convergence); the gradient is then "
            "that of a point that is not a solution"
        )
    warnings.warn(msg, ConvergenceWarning, stacklevel=4)


def _warn_backward(diag: Diagnostics, mode: BackwardMode, opts: Options) -> None:
    if not opts.warn:
        return
    B = diag.B
    n_sing = int(diag.singular.sum())
    if n_sing:
        warnings.warn(
            f"argmin (backward_mode={mode.value}): the Hessian of the Lagrangian is not positive "
            f"definite at the solution of {n_sing} of {B} sample(s) (a flat or saddle point, "
            "or a maximum): their gradient is set to zero",
            IllConditionedWarning,
            stacklevel=3,
        )
    n_rank = int((diag.rank_deficient & ~diag.singular).sum())
    if n_rank:
        warnings.warn(
            f"argmin (backward_mode={mode.value}): the constraint Jacobian A = D_y h is rank "
            f"deficient at the solution of {n_rank} of {B} sample(s): drop redundant "
            "constraints (Eq. 3 needs A of full row rank); their gradient is set to zero",
            IllConditionedWarning,
            stacklevel=3,
        )
    for what, (n_bad, total, worst) in diag.cg.items():
        if n_bad:
            warnings.warn(
                f"argmin (backward_mode={mode.value}): conjugate gradients for the {what} "
                f"stopped at their iteration limit before cg_tol={opts.cg_tol:g} in {n_bad} of "
                f"{total} system(s) (largest relative residual {worst:.3g}); raise "
                "cg_max_iter, or give hessian_approx to precondition",
                ConvergenceWarning,
                stacklevel=3,
            )


@dataclass
class _Call:
    """What the forward needs besides the inputs, and what it hands back besides y."""

    B: int
    dtype: torch.dtype
    check_leaves: bool
    info: SolverInfo | None = None
    diag: Diagnostics | None = None


class _ArgminFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: Problem, opts: Options, call: _Call, *xs: Tensor):
        y, info = _solve(problem, xs, opts, call.B, call.dtype)
        lam, call.info, call.diag = _optimality(problem, xs, y, info, opts, call.check_leaves)
        ctx.problem, ctx.opts = problem, opts
        ctx.save_for_backward(y, lam, *xs)
        return y

    @staticmethod
    def backward(ctx, v: Tensor):
        problem, opts = ctx.problem, ctx.opts
        first_derivatives_only(
            "argmin",
            opts.mode,
            "backward_mode='unroll' differentiates twice (with a differentiable solver)",
        )
        y, lam, *xs = ctx.saved_tensors
        need = [i for i, n in enumerate(ctx.needs_input_grad[3:]) if n]
        out: list[Tensor | None] = [None] * len(xs)
        if need:
            B = y.shape[0]
            bound = Bound(problem, xs, y.shape)
            yf = y.reshape(B, -1)
            idx = [i for i, used in zip(need, reads(bound, yf, need), strict=True) if used]
            if idx:
                diag = Diagnostics(B, y.device)
                vf = v.reshape(B, -1).to(y.dtype)
                grads = _BACKWARDS[opts.mode](bound, yf, lam, vf, idx, opts, diag)
                _warn_backward(diag, opts.mode, opts)
                for i, g in zip(idx, grads, strict=True):
                    out[i] = g
        return (None, None, None, *out)


def run(problem: Problem, xs: Sequence[Tensor], opts: Options, B: int, dtype):
    """y and its SolverInfo, with the backward of ``opts.mode``."""
    check_leaves = torch.is_grad_enabled()
    if opts.mode is BackwardMode.UNROLL:
        with torch.enable_grad():
            y, info = _solve(problem, xs, opts, B, dtype)
        if check_leaves and any(x.requires_grad for x in xs) and not y.requires_grad:
            raise ValueError(
                "backward_mode='unroll' differentiates through the solver, but its y does not "
                "require grad (the solver detaches, runs under no_grad, or leaves torch): use "
                "another backward mode, or a differentiable solver"
            )
        # the check must not see the unrolled graph: hidden leaves are fine under unroll
        _, info, diag = _optimality(problem, xs, y, info, opts, check_leaves=False)
    else:
        call = _Call(B, dtype, check_leaves)
        y = _ArgminFunction.apply(problem, opts, call, *xs)
        info, diag = call.info, call.diag
    _warn_forward(problem, info, opts)
    if opts.warn and bool(diag.rank_deficient.any()):
        _warn_backward(diag, opts.mode, opts)
    return y, info
