"""``robust_pool``: the functional form of the layer, on the shared skeleton (base.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from ddn_layers.base import LayerSpec, SolverInfo, run_layer
from ddn_layers.checks import compute_dtype
from ddn_layers.modes import BackwardMode
from ddn_layers.pooling.backward import BACKWARDS
from ddn_layers.pooling.options import PoolOptions, check_alpha, check_input
from ddn_layers.pooling.penalties import Penalty, get_penalty
from ddn_layers.pooling.solver import solve

SPEC = LayerSpec("robust_pool", solve, BACKWARDS, extra_keys=("start", "objective", "newton_steps"))


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
            through the iterations the solver ran from the winning start: the derivative
            of that finite computation, not of the minimiser. Where IRLS contracts, its
            error shrinks with the iterations as the iterate's does; it differs outright
            where that path is not smooth in x: a start already optimal passes on the
            start's derivative (the mean's, the median's, an input point's), and at a
            switch point of welsch or truncated quadratic (a point crossing alpha, another
            start winning) it is one side's derivative, where finite differences see a
            jump. No singular-Hessian check applies). All but ``unroll`` give first
            derivatives only: a backward with ``create_graph=True`` through them is a
            RuntimeError.
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
            A start where the objective exceeds (n - 1) phi_max, which every input point
            beats (it may be flat: every point's term at its cap), begins at the best of the
            8 input points nearest the mean; with at most 8 points, y is also compared with
            every input point, and the solve continues from one that scores lower.
        check_every: iterations between drops of converged samples (a host sync); default 1
            on CPU, 8 on GPU.
        return_info: also return a :class:`SolverInfo`; ``extra["start"]`` is the winning
            start (0 mean, 1 median, 2+k the k-th restart point, 2 + restarts the input
            point of the final check), ``extra["objective"]`` the objective at y,
            ``extra["newton_steps"]`` the Newton steps taken.

    Returns:
        y of shape (B, C) and dtype of x (half precision is solved in float32).

    At a solution where the Hessian is singular or indefinite (a minimiser that is not unique,
    e.g. ``huber`` with two points farther apart than 2 alpha; a saddle of ``welsch`` in a
    symmetric configuration; a Hessian singular to working precision) y does not depend
    smoothly on x: ``implicit`` and ``full`` give such samples a zero gradient and an
    ``IllConditionedWarning``.
    """
    x3 = check_input(x)
    pen = get_penalty(penalty)
    mode = BackwardMode.parse(backward_mode)
    options = PoolOptions(
        tol=tol, max_iter=max_iter, newton=newton, restarts=restarts,
        implicit_solver=implicit_solver, check_every=check_every,
    )  # fmt: skip
    return pool_with_options(x3, pen, alpha, mode, options, return_info=return_info)


def pool_with_options(
    x: Tensor,
    penalty: Penalty,
    alpha: float | Tensor,
    mode: BackwardMode,
    options: PoolOptions,
    *,
    return_info: bool,
) -> Tensor | tuple[Tensor, SolverInfo]:
    """``robust_pool`` once x (B, C, n), the penalty, the mode and the options are checked;
    alpha is checked here. Half precision is solved in float32, with autocast off."""
    dtype = compute_dtype(x.dtype)
    call = options.for_call(penalty, dtype, x.device, objective=return_info)
    a = check_alpha(alpha, dtype, x.device)
    with torch.autocast(x.device.type, enabled=False):
        y, info = run_layer(SPEC, mode, call, x.to(dtype).contiguous(), a)
    y = y.to(x.dtype)
    return (y, info) if return_info else y
