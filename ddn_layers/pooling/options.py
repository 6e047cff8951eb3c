"""The pooling layer's options, and the checks of its arguments (each failure a ValueError
naming the argument)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddn_layers.base import LayerOptions, option
from ddn_layers.checks import (
    FLOAT_DTYPES,
    at_least,
    check_bool,
    check_positive,
    check_tensor,
    one_of,
    or_none,
)
from ddn_layers.pooling.hessian import SOLVERS
from ddn_layers.pooling.penalties import Penalty

DEFAULT_TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
"""Relative residual at which a sample stops (a few ulps of y above the rounding floor)."""


def default_check_every(device: torch.device) -> int:
    """Iterations between convergence checks: each is a host sync, cheap on a CPU and a
    pipeline stall on a GPU."""
    return 1 if device.type == "cpu" else 8


@dataclass(frozen=True)
class PoolOptions(LayerOptions):
    """The solver options of ``robust_pool`` / ``RobustPool2d`` (see ``robust_pool``).

    ``tol=None`` is the default of the solve's dtype (:data:`DEFAULT_TOL`), ``check_every=None``
    that of its device (:func:`default_check_every`): both are resolved at call time.
    """

    tol: float | None = option(None, check=or_none(check_positive))
    max_iter: int = option(100, check=at_least(1))
    newton: bool = option(True, check=check_bool)
    restarts: int = option(0, check=at_least(0))
    implicit_solver: str = option("auto", check=one_of(SOLVERS))
    check_every: int | None = option(None, check=or_none(at_least(1)))

    def for_call(
        self, penalty: Penalty, dtype: torch.dtype, device: torch.device, objective: bool
    ) -> PoolCall:
        """What one call runs with: these options, their defaults resolved for ``dtype`` and
        ``device``, and the penalty."""
        check_every = self.check_every
        return PoolCall(
            penalty=penalty,
            tol=DEFAULT_TOL[dtype] if self.tol is None else self.tol,
            max_iter=self.max_iter,
            newton=self.newton,
            restarts=self.restarts,
            implicit_solver=self.implicit_solver,
            check_every=default_check_every(device) if check_every is None else check_every,
            objective=objective,
        )


@dataclass(frozen=True)
class PoolCall:
    """The solver's and the backward's view of one call (the ``opts`` of ``run_layer``).

    ``objective``: whether the objective at y is wanted (``return_info``); without it a
    single start's objective, or the mean's, is not evaluated (NaN in the record).
    """

    penalty: Penalty
    tol: float
    max_iter: int
    newton: bool
    restarts: int
    implicit_solver: str
    check_every: int
    objective: bool


def check_input(x: object) -> torch.Tensor:
    """x (B, C, *) -> (B, C, n) with n = prod(*). Finiteness is checked by the solver, from the
    mean it computes anyway (``solver._mean``): one pass over x fewer."""
    if isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES and x.dim() >= 3 and x.numel():
        return x.flatten(2)
    return check_tensor(x, "x", min_ndim=3).flatten(2)


def check_alpha(alpha: object, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A positive scalar (number or one-element tensor, possibly learnable) -> 0-d tensor.

    A tensor keeps its autograd history, so that a learnable alpha receives a gradient.
    """
    a = check_positive(alpha, "alpha")
    if isinstance(alpha, torch.Tensor):
        return alpha.reshape(()).to(dtype=dtype, device=device)
    return torch.tensor(a, dtype=dtype, device=device)
