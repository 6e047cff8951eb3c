"""``argmin``, the functional form of the generic node: checks its arguments, builds the
options and runs the node through the shared dispatcher (``base.run_layer``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ddn_layers.base import LayerSpec, SolverInfo, run_layer
from ddn_layers.checks import compute_dtype
from ddn_layers.generic.backward import BACKWARDS
from ddn_layers.generic.options import ArgminOptions
from ddn_layers.generic.problem import Problem, check_inputs, make_problem
from ddn_layers.generic.solver import solve
from ddn_layers.modes import BackwardMode

SPEC = LayerSpec("argmin", solve, BACKWARDS, extra_keys=None)
"""The user's solver may report any ``SolverInfo.extra`` entries: they are passed on."""


def argmin(
    objective: Callable[..., Tensor],
    *inputs: Tensor,
    constraints: Callable[..., Tensor] | None = None,
    solver: Callable[..., Tensor] | None = None,
    init: Callable[..., Tensor] | None = None,
    hessian_approx: Callable[..., Tensor] | None = None,
    backward_mode: BackwardMode | str = BackwardMode.IMPLICIT,
    implicit_solver: str = "auto",
    tol: float | None = None,
    max_iter: int = 50,
    kkt_tol: float | None = None,
    cg_tol: float | None = None,
    cg_max_iter: int | None = None,
    precondition: bool = True,
    check_every: int | None = None,
    warn: bool = True,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, SolverInfo]:
    """y = argmin_u objective(*inputs, u)  s.t.  constraints(*inputs, u) = 0, per sample,
    differentiable in every input by implicit differentiation (Eq. 3 of Gould et al.).

    Everything is batched: each input has the batch size B on its first axis (expand a
    parameter shared by the batch, ``alpha.expand(B)``: autograd then sums its gradient), and
    sample b of the objective and constraints may read only sample b of the inputs and of y.

    Args:
        objective: ``objective(*inputs, y) -> (B,)``, the value per sample; twice
            differentiable in y (and once in y, then once in each input that needs a gradient)
            with torch.func.
        *inputs: tensors, each (B, ...). Integer tensors are passed through (no gradient).
            An input that neither the objective nor the constraints read gets no gradient
            (None), like any unused input under autograd.
        constraints: ``constraints(*inputs, y) -> (B, p)`` (or (B,) for p = 1), the equality
            constraints h = 0. They must be independent (A = D_y h of full row rank): drop
            redundant ones (e.g. one marginal constraint of optimal transport).
        solver: ``solver(*inputs) -> y`` with y of shape (B, ...), your forward; it may also
            return ``(y, SolverInfo)``. Runs under ``torch.no_grad`` except for ``unroll``. Its
            y is checked against the optimality conditions (``kkt_tol``). Required with
            constraints.
        init: ``init(*inputs) -> y0`` instead of a solver: the start of the default forward,
            batched Newton-CG (unconstrained problems only). It fixes the shape of y.
        hessian_approx: ``hessian_approx(*inputs, y)``, a cheap positive definite
            approximation of the Hessian of the Lagrangian in y: (B,) (a multiple of the
            identity), y's shape (a diagonal) or (B, m, m) with m = y[0].numel(). ``approx``
            uses it in place of H; ``implicit`` uses it to precondition CG.
        backward_mode: ``implicit`` (Eq. 3 matrix-free: CG on Hessian-vector products, the
            p x p Schur complement for constraints), ``full`` (dense H, A, B, C from
            torch.func; Cholesky), ``approx`` (H replaced by ``hessian_approx``), ``unroll``
            (autograd through the solver's iterations: the derivative of the iterations that
            ran, so a start that is already optimal passes on the start's derivative). All
            but ``unroll`` give first derivatives only: a backward with ``create_graph=True``
            through them is a RuntimeError.
        implicit_solver: the Schur complement of ``implicit`` and ``approx``: ``cholesky``
            (formed from p Hessian solves), ``cg`` (matrix-free, nested CG) or ``auto`` (by
            size).
        tol: Newton-CG stops a sample at ||grad f||_inf <= tol (1 + ||grad f(y0)||_inf);
            default 1e-10 in float64, 1e-5 in float32.
        max_iter: Newton iterations per sample.
        kkt_tol: a user solver's y counts as converged when its stationarity
            ||grad f - A^T lam||_inf / (1 + ||grad f||_inf) and feasibility ||h||_inf are both
            within it; default 1e-6 in float64, 1e-3 in float32.
        cg_tol: relative residual of every CG solve in the backward; default 1e-10 in float64,
            1e-5 in float32.
        cg_max_iter: iterations per CG solve; default min(2 size, 1000), at least 50.
        precondition: precondition ``implicit``'s CG with ``hessian_approx`` when given.
        check_every: iterations between host syncs that stop loops early (1 on CPU, 8 on GPU).
        warn: issue ConvergenceWarning (a solve stopped short) and IllConditionedWarning (no
            well-defined gradient: H not positive definite, A rank deficient; those samples
            get a zero gradient). The counts are always in the returned info.
        return_info: also return a :class:`SolverInfo`: per-sample iterations (0 when a user
            solver reports none), residual, converged, and ``extra`` with ``objective``,
            ``stationarity`` and (constrained) ``feasibility``.

    Returns:
        y as the solver (or init) shaped it, in the inputs' dtype (half precision is solved
        in float32).
    """
    problem = make_problem(objective, constraints, solver, init, hessian_approx)
    options = ArgminOptions(
        implicit_solver=implicit_solver,
        tol=tol,
        max_iter=max_iter,
        kkt_tol=kkt_tol,
        cg_tol=cg_tol,
        cg_max_iter=cg_max_iter,
        precondition=precondition,
        check_every=check_every,
        warn=warn,
    )
    mode = BackwardMode.parse(backward_mode)
    y, info = argmin_with_options(problem, inputs, options, mode)
    return (y, info) if return_info else y


def argmin_with_options(
    problem: Problem, inputs: Sequence[Tensor], options: ArgminOptions, mode: BackwardMode
) -> tuple[Tensor, SolverInfo]:
    """y and its record for validated options (the module's forward and ``argmin``)."""
    _, in_dtype = check_inputs(inputs)
    if mode is BackwardMode.APPROX and problem.hessian_approx is None:
        raise ValueError(
            "backward_mode='approx' needs hessian_approx=fn(*inputs, y) returning a cheap "
            "positive definite Hessian approximation ((B,), y's shape for a diagonal, or "
            "(B, m, m)); choose another mode otherwise"
        )
    dtype = compute_dtype(in_dtype)
    device = next(x.device for x in inputs if x.is_floating_point())
    call = options.for_call(problem, mode, dtype, device, check_leaves=torch.is_grad_enabled())
    xs = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
    y, info = run_layer(SPEC, mode, call, *xs)
    return y.to(in_dtype), info
