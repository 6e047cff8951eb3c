"""``argmin`` and ``DeclarativeNode``: a declarative node from an objective and constraints."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ddn_layers.base import DeclarativeLayer, SolverInfo
from ddn_layers.checks import compute_dtype
from ddn_layers.generic.function import run
from ddn_layers.generic.options import make_options
from ddn_layers.generic.problem import Problem, check_inputs, make_problem
from ddn_layers.modes import BackwardMode


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
            ran, so a start that is already optimal passes on the start's derivative).
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
    return _call(problem, inputs, return_info=return_info, **_collect(locals()))


_OPTIONS = (
    "backward_mode",
    "implicit_solver",
    "tol",
    "max_iter",
    "kkt_tol",
    "cg_tol",
    "cg_max_iter",
    "precondition",
    "check_every",
    "warn",
)
_OPTION_DEFAULTS = {
    k: v.default for k, v in inspect.signature(argmin).parameters.items() if k in _OPTIONS
}


def _collect(scope: dict[str, Any]) -> dict[str, Any]:
    return {k: scope[k] for k in _OPTIONS}


def _call(problem: Problem, inputs, *, return_info: bool, **options: Any):
    B, in_dtype = check_inputs(inputs)
    dtype = compute_dtype(in_dtype)
    device = next(x.device for x in inputs if x.is_floating_point())
    opts = make_options(dtype=dtype, device=device, **options)
    if opts.mode is BackwardMode.APPROX and problem.hessian_approx is None:
        raise ValueError(
            "backward_mode='approx' needs hessian_approx=fn(*inputs, y) returning a cheap "
            "positive definite Hessian approximation ((B,), y's shape for a diagonal, or "
            "(B, m, m)); choose another mode otherwise"
        )
    xs = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
    y, info = run(problem, xs, opts, B, dtype)
    y = y.to(in_dtype)
    return (y, info) if return_info else y


class DeclarativeNode(DeclarativeLayer):
    """A declarative node as a module: ``node(*inputs) -> y``; see :func:`argmin`.

    Example (robust pooling with the pseudo-Huber penalty, default Newton-CG forward)::

        def objective(x, y):  # x (B, C, n) points, y (B, C)
            z2 = ((y.unsqueeze(-1) - x) ** 2).sum(1)
            return (torch.sqrt(1 + z2) - 1).sum(-1)

        pool = ddn.DeclarativeNode(objective, init=lambda x: x.mean(-1))
        y = pool(x)

    ``backward_mode`` may be reassigned (a run-wide switch sets it on every layer);
    ``last_info`` holds the :class:`SolverInfo` of the latest call.
    """

    def __init__(
        self,
        objective: Callable[..., Tensor],
        constraints: Callable[..., Tensor] | None = None,
        *,
        solver: Callable[..., Tensor] | None = None,
        init: Callable[..., Tensor] | None = None,
        hessian_approx: Callable[..., Tensor] | None = None,
        backward_mode: BackwardMode | str = BackwardMode.IMPLICIT,
        **options: Any,
    ) -> None:
        super().__init__(backward_mode)
        self.problem = make_problem(objective, constraints, solver, init, hessian_approx)
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)}; choices: "
                f"{sorted(set(_OPTIONS) - {'backward_mode'})}"
            )
        # bad values fail here, at construction, rather than at the first batch
        make_options(
            dtype=torch.float64,
            device=torch.device("cpu"),
            **(_OPTION_DEFAULTS | options | {"backward_mode": backward_mode}),
        )
        self.options = dict(options)

    def forward(self, *inputs: Tensor) -> Tensor:
        opts = _OPTION_DEFAULTS | self.options | {"backward_mode": self.backward_mode}
        y, self.last_info = _call(self.problem, inputs, return_info=True, **opts)
        return y

    def extra_repr(self) -> str:
        parts = [f"backward_mode={self.backward_mode.value}"]
        parts += [f"{k}={v!r}" for k, v in self.options.items()]
        if self.problem.constrained:
            parts.append("constrained")
        return ", ".join(parts)
