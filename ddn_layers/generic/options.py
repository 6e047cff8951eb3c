"""The generic node's options, checked once: every bad value is a ValueError naming it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddn_layers.checks import check_choice, check_int, check_positive
from ddn_layers.modes import BackwardMode

IMPLICIT_SOLVERS = ("auto", "cholesky", "cg")
"""How ``implicit`` (and ``approx``) solve the p x p Schur complement A H^-1 A^T of a
constrained node: formed from p Hessian solves and factorised (``cholesky``), or matrix-free by
conjugate gradients around an inner Hessian solve (``cg``); ``auto`` forms it while its p
right-hand sides fit :data:`EXPLICIT_SCHUR_ENTRIES`."""

EXPLICIT_SCHUR_ENTRIES = 2**22
"""Largest p * B * m for which ``auto`` forms the Schur complement: its Hessian solves keep
about five (p, B, m) blocks alive, 160 MiB in float64 at this size."""

# Stopping rules in units of each dtype's precision: the default solver stops near the
# rounding floor of the gradient, so that the implicit gradient (whose error is the
# stationarity error times the conditioning) keeps ~6 digits in float64.
DEFAULT_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DEFAULT_CG_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# A user solver's result is checked against the optimality conditions; this is a sanity check
# for a solver that stopped far from a KKT point, not the solver's own tolerance.
DEFAULT_KKT_TOL = {torch.float32: 1e-3, torch.float64: 1e-6}


@dataclass(frozen=True)
class Options:
    mode: BackwardMode
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


def make_options(
    *,
    dtype: torch.dtype,
    device: torch.device,
    backward_mode,
    implicit_solver: str,
    tol,
    max_iter,
    kkt_tol,
    cg_tol,
    cg_max_iter,
    precondition,
    check_every,
    warn,
) -> Options:
    if not isinstance(precondition, bool):
        raise ValueError(f"precondition must be True or False, got {precondition!r}")
    if not isinstance(warn, bool):
        raise ValueError(f"warn must be True or False, got {warn!r}")
    if check_every is None:
        # each check is a host sync: free on a CPU, a pipeline stall on a GPU
        check_every = 1 if device.type == "cpu" else 8
    return Options(
        mode=BackwardMode.parse(backward_mode),
        implicit_solver=check_choice(implicit_solver, "implicit_solver", IMPLICIT_SOLVERS),
        tol=check_positive(DEFAULT_TOL[dtype] if tol is None else tol, "tol"),
        max_iter=check_int(max_iter, "max_iter", 1),
        kkt_tol=check_positive(DEFAULT_KKT_TOL[dtype] if kkt_tol is None else kkt_tol, "kkt_tol"),
        cg_tol=check_positive(DEFAULT_CG_TOL[dtype] if cg_tol is None else cg_tol, "cg_tol"),
        cg_max_iter=None if cg_max_iter is None else check_int(cg_max_iter, "cg_max_iter", 1),
        precondition=precondition,
        check_every=check_int(check_every, "check_every", 1),
        warn=warn,
    )
