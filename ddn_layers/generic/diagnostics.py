"""What went wrong in a backward solve, gathered per sample so that the node warns once."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ddn_layers.checks import ConvergenceWarning, IllConditionedWarning
from ddn_layers.generic.options import ArgminCall
from ddn_layers.linalg import CGResult


@dataclass
class Diagnostics:
    """Per-sample flags and per-kind CG counts of one set of solves."""

    B: int
    device: torch.device
    singular: Tensor = field(init=False)
    """H not positive definite (or numerically singular) at the sample's solution."""
    rank_deficient: Tensor = field(init=False)
    """A H^-1 A^T (or A A^T) singular: the constraint Jacobian A is rank deficient."""
    cg: dict[str, list[int | float]] = field(default_factory=dict)
    """Per kind of solve: [systems not converged, systems solved, worst relative residual]."""

    def __post_init__(self) -> None:
        self.singular = torch.zeros(self.B, dtype=torch.bool, device=self.device)
        self.rank_deficient = torch.zeros_like(self.singular)

    def add_cg(self, what: str, res: CGResult) -> Tensor:
        """Record a CG run; returns per sample whether any of its systems met a flat or
        negative curvature (what that means is the caller's to say)."""
        unconverged = ~res.converged & ~res.indefinite
        entry = self.cg.setdefault(what, [0, 0, 0.0])
        entry[0] += int(unconverged.sum())
        entry[1] += unconverged.numel()
        if bool(unconverged.any()):
            entry[2] = max(entry[2], float(res.residual[unconverged].max()))
        # leading axes other than the batch are right-hand sides of the same sample
        return res.indefinite.reshape(-1, self.B).any(0)

    @property
    def bad(self) -> Tensor:
        return self.singular | self.rank_deficient


def warn_ill_posed(diag: Diagnostics, call: ArgminCall) -> None:
    """One warning per kind of trouble, with its count (unless ``warn=False``): samples
    without a well-defined gradient (their gradient is zero) and CG solves that stopped at
    their limit."""
    if not call.warn:
        return
    B, mode = diag.B, call.mode
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
                f"stopped at their iteration limit before cg_tol={call.cg_tol:g} in {n_bad} of "
                f"{total} system(s) (largest relative residual {worst:.3g}); raise "
                "cg_max_iter, or give hessian_approx to precondition",
                ConvergenceWarning,
                stacklevel=3,
            )
