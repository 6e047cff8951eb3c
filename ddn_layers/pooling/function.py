"""``robust_pool``: the functional form of the layer, and its autograd.Function."""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import Tensor

from ddn_layers.base import SolverInfo
from ddn_layers.checks import IllConditionedWarning, compute_dtype
from ddn_layers.modes import BackwardMode, first_derivatives_only
from ddn_layers.pooling import backward as bw
from ddn_layers.pooling.options import check_alpha, check_input, solve_options
from ddn_layers.pooling.penalties import Penalty, get_penalty
from ddn_layers.pooling.solver import Solution, SolveOptions, solve


class _RobustPoolFunction(torch.autograd.Function):
    """y = argmin_u sum_i phi(||u - x_i||; alpha); backward by implicit differentiation."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, penalty: Penalty, mode, opts: SolveOptions):
        sol = solve(x, alpha, penalty, opts)  # autograd is off inside Function.forward
        ctx.save_for_backward(x, sol.y, alpha)
        ctx.penalty, ctx.mode, ctx.solver = penalty, mode, opts.implicit_solver
        record = (sol.iterations, sol.residual, sol.converged, sol.start, sol.objective)
        ctx.mark_non_differentiable(*record, sol.newton_steps)
        return sol.y, *record, sol.newton_steps

    @staticmethod
    def backward(ctx, v: Tensor, *_unused):
        first_derivatives_only(
            "robust_pool", ctx.mode, "backward_mode='unroll' differentiates twice"
        )
        x, y, alpha = ctx.saved_tensors
        need_x, need_alpha = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        penalty = ctx.penalty
        with torch.autocast(x.device.type, enabled=False):
            v = v.to(x.dtype)
            if ctx.mode is BackwardMode.FULL:
                g = bw.full_grads(x, y, alpha, v, penalty, need_x, need_alpha)
            elif ctx.mode is BackwardMode.APPROX:
                g = bw.approx_grads(x, y, alpha, v, penalty, need_x, need_alpha)
            else:
                g = bw.implicit_grads(x, y, alpha, v, penalty, ctx.solver, need_x, need_alpha)
        bad = int(g.singular.sum())
        if bad:
            warnings.warn(
                f"robust_pool ({penalty.name}, backward_mode={ctx.mode.value}): the Hessian is "
                f"singular or indefinite at the solution of {bad} of {x.shape[0]} samples (a "
                "flat objective, e.g. every point farther than alpha, or a saddle point); "
                "their gradient is set to zero",
                IllConditionedWarning,
                stacklevel=2,
            )
        g_alpha = g.alpha.sum().reshape(alpha.shape) if g.alpha is not None else None
        return g.x, g_alpha, None, None, None


def _info(sol: Solution) -> SolverInfo:
    return SolverInfo(
        iterations=sol.iterations,
        residual=sol.residual,
        converged=sol.converged,
        extra={"start": sol.start, "objective": sol.objective, "newton_steps": sol.newton_steps},
    )


def robust_pool(
    x: Tensor,
    penalty: str | Penalty = "pseudo-huber",
    alpha: float | Tensor = 1.0,
    *,
    backward_mode: BackwardMode | str = "implicit",
    implicit_solver: str = "auto",
    tol: float | None = None,
    max_iter: int = 100,
    newton: bool = True,
    restarts: int = 0,
    check_every: int | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, SolverInfo]:
    """Robust vector pooling: y_b = argmin_u sum_i phi(||u - x_{b,:,i}||; alpha).

    Args:
        x: features, shape (B, C, *): B samples of n = prod(*) points in C channels
            (a (B, C, H, W) feature map pools over its H x W positions).
        penalty: a name in ``ddn.PENALTIES`` (``quadratic`` = average pooling,
            ``pseudo-huber``, ``huber``, ``welsch``, ``truncated-quadratic``) or a
            :class:`Penalty`.
        alpha: the penalty's scale (> 0): a number, or a one-element tensor that may require
            grad (it then receives dJ/dalpha by implicit differentiation).
        backward_mode: ``implicit`` (Eq. 10 left to right), ``full`` (explicit per-point
            B_j, O(n C^2) memory), ``approx`` (H ~ (sum kappa1) I and B_j ~ kappa1_j I:
            the weights held fixed; exact where kappa2 = 0), ``unroll`` (autograd
            through the solver's iterations: the derivative of the iterations that ran,
            so a start that is already optimal passes on the start's derivative, and no
            singular-Hessian check applies). All but ``unroll`` give first derivatives
            only: a backward with ``create_graph=True`` through them is a RuntimeError.
        implicit_solver: for the Hessian solves of ``implicit`` (and the Newton steps):
            ``cholesky`` (C x C), ``woodbury`` (n x n) or ``auto`` (the smaller).
        tol: stop a sample when ||grad f|| / sum kappa1 <= tol * (alpha + max|y|), measured,
            or predicted below tol / 4 for the step it then takes (see solver.py); default
            1e-6 in float32 (and half precision), 1e-12 in float64.
        max_iter: iterations per start; not converging is a ``ConvergenceWarning``.
        newton: where IRLS contracts so slowly that Newton steps are cheaper (see
            solver.py), try one, kept only if the Hessian is positive definite and the
            objective does not rise. False: IRLS only.
        restarts: non-convex penalties start from the mean and the coordinate-wise median;
            this adds the ``restarts`` input points nearest that median (the best wins).
        check_every: iterations between drops of converged samples (a host sync); default 1
            on CPU, 8 on GPU.
        return_info: also return a :class:`SolverInfo`; ``extra["start"]`` is the winning
            start (0 mean, 1 median, 2+k the k-th restart point), ``extra["objective"]`` the
            objective at y.

    Returns:
        y of shape (B, C) and dtype of x (half precision is solved in float32).

    At a solution where the Hessian is singular or indefinite (a flat objective: e.g. every
    point farther than alpha for ``truncated-quadratic``; a saddle of ``welsch``) y does not
    depend smoothly on x: such samples get a zero gradient and an ``IllConditionedWarning``.
    """
    x3 = check_input(x)
    pen = get_penalty(penalty)
    mode = BackwardMode.parse(backward_mode)
    dtype = compute_dtype(x3.dtype)
    opts = solve_options(
        dtype=dtype, device=x3.device, tol=tol, max_iter=max_iter, newton=newton,
        restarts=restarts, implicit_solver=implicit_solver,
        check_every=check_every,
    )  # fmt: skip
    if not return_info:
        opts = dataclasses.replace(opts, objective=False)
    a = check_alpha(alpha, dtype, x3.device)
    xc = x3.to(dtype).contiguous()

    with torch.autocast(x3.device.type, enabled=False):
        if mode is BackwardMode.UNROLL:
            sol = solve(xc, a, pen, opts)
        else:
            y, *record = _RobustPoolFunction.apply(xc, a, pen, mode, opts)
            sol = Solution(y, *record)
    y = sol.y.to(x3.dtype)
    return (y, _info(sol)) if return_info else y
