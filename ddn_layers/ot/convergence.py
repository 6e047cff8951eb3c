"""The ConvergenceWarning of both OT layers: how many samples missed tol, and why."""

from __future__ import annotations

import warnings

from torch import Tensor

from ddn_layers.base import SolverInfo
from ddn_layers.checks import ConvergenceWarning


def warn_unconverged(
    info: SolverInfo,
    stalled: Tensor,
    *,
    layer: str,
    error: str,
    tol: float,
    max_iter: int,
    stacklevel: int,
) -> None:
    """Warn when a sample missed ``tol``: how many stalled at the precision floor of their
    potentials (``stalled``, one flag per sample) and how many ran to ``max_iter``, each with
    its own advice. ``layer`` opens the message, ``error`` names what ``info.residual`` is;
    ``stacklevel`` points the warning at the user's call."""
    missed = ~info.converged
    n_bad = int(missed.sum())
    if not n_bad:
        return
    stalled = stalled[missed]
    reasons = []
    if bool(stalled.any()):
        floor = float(info.residual[missed][stalled].min())
        reasons.append(
            f"{int(stalled.sum())} stalled at the precision floor of their potentials "
            f"(smallest {error} {floor:.3g}, set by gamma times the cost range in this dtype: "
            "raise tol or use float64)"
        )
    if not bool(stalled.all()):
        reasons.append(
            f"{int((~stalled).sum())} ran to max_iter={max_iter} (raise max_iter or lower gamma)"
        )
    warnings.warn(
        f"{layer}: {n_bad} of {info.converged.numel()} sample(s) did not reach tol={tol:g} "
        f"(largest {error} {float(info.residual.max()):.3g}): " + "; ".join(reasons),
        ConvergenceWarning,
        stacklevel=stacklevel + 1,
    )
