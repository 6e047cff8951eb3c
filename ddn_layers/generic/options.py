"""The generic node's options, each checked when the options are built (a bad value is a
ValueError naming it), and what one call runs with once the per-dtype defaults are resolved."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddn_layers.base import LayerOptions, option
from ddn_layers.checks import at_least, check_bool, check_positive, one_of, or_none
from ddn_layers.generic.problem import Problem
from ddn_layers.modes import BackwardMode

IMPLICIT_SOLVERS = ("auto", "cholesky", "cg")
"""How ``implicit`` (and ``approx``) solve the p x p Schur complement A H^-1 A^T of a
constrained node: formed from p Hessian solves and factorised (``cholesky``), or matrix-free by
conjugate gradients around an inner Hessian solve (``cg``); ``auto`` forms it while its p
right-hand sides fit :data:`EXPLICIT_SCHUR_ENTRIES`."""

EXPLICIT_SCHUR_ENTRIES = 2**22
"""Largest p * B * m for which ``auto`` forms the Schur complement: its Hessian solves keep
about five (p, B, m) blocks alive, so this bounds their memory."""

# Stopping rules in units of each dtype's precision: the default solver stops near the
# rounding floor of the gradient, so that the implicit gradient (whose error is the
# stationarity error times the conditioning) keeps ~6 digits in float64.
DEFAULT_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DEFAULT_CG_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# A user solver's result is checked against the optimality conditions; this is a sanity check
# for a solver that stopped far from a KKT point, not the solver's own tolerance.
DEFAULT_KKT_TOL = {torch.float32: 1e-3, torch.float64: 1e-6}


def default_check_every(device: torch.device) -> int:
    """Iterations between the host syncs that stop loops early: free on a CPU, a pipeline
    stall on a GPU."""
    return 1 if device.type == "cpu" else 8


@dataclass(frozen=True)
class ArgminOptions(LayerOptions):
    """The solver options of ``argmin`` / ``DeclarativeNode`` (see ``argmin`` for each).

    ``None`` for ``tol``, ``kkt_tol`` and ``cg_tol`` is the default of the solve's dtype, for
    ``check_every`` that of its device, for ``cg_max_iter`` one by system size: all resolved
    at call time (:meth:`for_call`, :meth:`ArgminCall.cg_iters`).
    """

    implicit_solver: str = option("auto", check=one_of(IMPLICIT_SOLVERS))
    tol: float | None = option(None, check=or_none(check_positive))
    max_iter: int = option(50, check=at_least(1))
    kkt_tol: float | None = option(None, check=or_none(check_positive))
    cg_tol: float | None = option(None, check=or_none(check_positive))
    cg_max_iter: int | None = option(None, check=or_none(at_least(1)))
    precondition: bool = option(True, check=check_bool)
    check_every: int | None = option(None, check=or_none(at_least(1)))
    warn: bool = option(True, check=check_bool)

    def for_call(
        self,
        problem: Problem,
        mode: BackwardMode,
        dtype: torch.dtype,
        device: torch.device,
        check_leaves: bool,
    ) -> ArgminCall:
        """What one call runs with: the problem, the mode, and these options with their
        defaults resolved for ``dtype`` and ``device``."""
        check_every = self.check_every
        return ArgminCall(
            problem=problem,
            mode=mode,
            check_leaves=check_leaves,
            implicit_solver=self.implicit_solver,
            tol=DEFAULT_TOL[dtype] if self.tol is None else self.tol,
            max_iter=self.max_iter,
            kkt_tol=DEFAULT_KKT_TOL[dtype] if self.kkt_tol is None else self.kkt_tol,
            cg_tol=DEFAULT_CG_TOL[dtype] if self.cg_tol is None else self.cg_tol,
            cg_max_iter=self.cg_max_iter,
            precondition=self.precondition,
            check_every=default_check_every(device) if check_every is None else check_every,
            warn=self.warn,
        )


@dataclass(frozen=True)
class ArgminCall:
    """The solver's and the backward's view of one call (the ``opts`` of ``run_layer``).

    ``check_leaves``: grad mode was on at the call, so a tensor that requires grad hidden in
    the user's functions (not an input) would lose its gradient and is refused.
    """

    problem: Problem
    mode: BackwardMode
    check_leaves: bool
    implicit_solver: str
    tol: float
    max_iter: int
    kkt_tol: float
    cg_tol: float
    cg_max_iter: int | None
    precondition: bool
    check_every: int
    warn: bool

    def cg_iters(self, size: int) -> int:
        """CG's iteration limit for systems of ``size`` unknowns: in exact arithmetic CG ends
        within ``size`` steps; rounding needs some slack, and very large systems a cap (a
        CG that hits it warns, naming cg_max_iter)."""
        if self.cg_max_iter is not None:
            return self.cg_max_iter
        return max(50, min(2 * size, 1000))
