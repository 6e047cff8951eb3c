"""The optimal transport layer's options: each one checked once, when the options are built."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ddn_layers.base import LayerOptions, option
from ddn_layers.checks import at_least, check_bool, check_positive, one_of
from ddn_layers.ot.unbalanced.options import check_marginal_penalty

IMPLICIT_SOLVERS = ("auto", "cholesky", "cg")
"""How ``implicit`` solves its Schur complement: ``auto`` chooses by cost (see backward.py)."""


def check_gamma(value: object, name: str) -> float:
    """A positive number; a tensor that requires grad is refused rather than silently made a
    constant. P depends on M and gamma only through gamma * M, so a learned gamma is exactly
    ``sinkhorn(gamma * M, r, c, gamma=1.0)``."""
    if isinstance(value, Tensor) and value.requires_grad:
        raise ValueError(
            f"{name} must be a number or a tensor without grad (the layer does not "
            f"differentiate {name}); P depends on M and {name} only through {name} * M, so to "
            f"learn {name} pass M * {name} with {name}=1.0"
        )
    return check_positive(value, name)


@dataclass(frozen=True)
class OTOptions(LayerOptions):
    """Options of :func:`~ddn_layers.sinkhorn` and :class:`~ddn_layers.OptimalTransport`.

    ``gamma``: inverse regularisation strength (not differentiated: a tensor that requires
    grad is refused, see :func:`check_gamma`); ``tol``: L1 marginal error of the returned plan
    at which a sample has converged; ``max_iter``: iteration limit per sample;
    ``implicit_solver``: one of :data:`IMPLICIT_SOLVERS`; ``check_every``: iterations between
    convergence checks (each is one host sync); ``warn``: raise a ConvergenceWarning for
    samples that did not converge; ``marginal_penalty``: None (the balanced problem) or the
    pair (rho_r, rho_c) of KL penalties of the unbalanced problem (a number is used for both
    sides; inf on both sides is None); ``log_plan``: return log P instead of P (see
    :func:`~ddn_layers.sinkhorn`).
    """

    gamma: float = option(10.0, check=check_gamma)
    tol: float = option(1e-6, check=check_positive)
    max_iter: int = option(1000, check=at_least(1))
    implicit_solver: str = option("auto", check=one_of(IMPLICIT_SOLVERS))
    check_every: int = option(10, check=at_least(1))
    warn: bool = option(True, check=check_bool)
    marginal_penalty: tuple[float, float] | None = option(None, check=check_marginal_penalty)
    log_plan: bool = option(False, check=check_bool)
