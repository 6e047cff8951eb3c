"""Options of unbalanced optimal transport: the marginal penalty and the solver's settings."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from torch import Tensor

from ddn_layers.base import LayerOptions, option
from ddn_layers.checks import at_least, check_bool, check_positive, one_of

IMPLICIT_SOLVERS = ("auto", "cholesky", "cg")
"""How ``implicit`` solves its Schur complement: ``auto`` chooses by cost (see backward.py)."""


def _penalty_value(value: object, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.requires_grad:
            raise ValueError(f"{name} must hold numbers (no tensor with grad or several entries)")
        value = float(value.detach())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number > 0 or inf, got {value!r}")
    v = float(value)
    if math.isnan(v) or v <= 0:
        raise ValueError(f"{name} must be a number > 0 or inf, got {v}")
    return v


def check_marginal_penalty(value: object, name: str) -> tuple[float, float] | None:
    """None (the balanced problem), or the pair (rho_r, rho_c) of KL penalties on the row and
    column marginals, each > 0 and possibly inf (a hard marginal). A number is used for both
    sides; None, inf and (inf, inf) all mean the balanced problem and come back as None."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a number or a pair (rho_r, rho_c), got {value!r}")
        pair = (_penalty_value(value[0], name), _penalty_value(value[1], name))
    else:
        rho = _penalty_value(value, name)
        pair = (rho, rho)
    return None if math.isinf(pair[0]) and math.isinf(pair[1]) else pair


def check_penalty_pair(value: object, name: str) -> tuple[float, float]:
    """A pair (rho_r, rho_c) with at least one finite side: the unbalanced problem."""
    pair = check_marginal_penalty(value, name)
    if pair is None:
        raise ValueError(f"{name} must have a finite side for the unbalanced solver, got {value!r}")
    return pair


@dataclass(frozen=True)
class UnbalancedOptions(LayerOptions):
    """Options of the unbalanced solver (built by :func:`~ddn_layers.sinkhorn` when
    ``marginal_penalty`` has a finite side).

    ``marginal_penalty``: (rho_r, rho_c); ``gamma``: inverse regularisation strength; ``tol``:
    residual of the optimality conditions (see solver.py) at which a sample has converged;
    ``max_iter``: iteration limit per sample, over all annealing stages; ``implicit_solver``:
    one of :data:`IMPLICIT_SOLVERS`; ``check_every``: iterations between convergence checks;
    ``warn``: raise a ConvergenceWarning for samples that did not converge; ``anneal``:
    run the gamma schedule where it pays (annealing.py), False for a single stage;
    ``log_plan``: return log P instead of P.
    """

    marginal_penalty: tuple[float, float] = option(check=check_penalty_pair)
    gamma: float = option(10.0, check=check_positive)
    tol: float = option(1e-6, check=check_positive)
    max_iter: int = option(1000, check=at_least(1))
    implicit_solver: str = option("auto", check=one_of(IMPLICIT_SOLVERS))
    check_every: int = option(10, check=at_least(1))
    warn: bool = option(True, check=check_bool)
    anneal: bool = option(True, check=check_bool)
    log_plan: bool = option(False, check=check_bool)

    @classmethod
    def of(cls, opts) -> UnbalancedOptions:
        """The options of the balanced layer's :class:`~ddn_layers.ot.options.OTOptions` whose
        ``marginal_penalty`` has a finite side (checked there)."""
        return cls(
            marginal_penalty=opts.marginal_penalty,
            gamma=opts.gamma,
            tol=opts.tol,
            max_iter=opts.max_iter,
            implicit_solver=opts.implicit_solver,
            check_every=opts.check_every,
            warn=opts.warn,
            log_plan=opts.log_plan,
        )
