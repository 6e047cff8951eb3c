"""Validation of the pooling layer's arguments: every bad value is a ValueError naming it."""

from __future__ import annotations

import torch

from ddn_layers.checks import (
    FLOAT_DTYPES,
    check_choice,
    check_int,
    check_positive,
    check_tensor,
)
from ddn_layers.pooling.linalg import SOLVERS
from ddn_layers.pooling.solver import SolveOptions

DEFAULT_TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
"""Relative residual at which a sample stops (a few ulps of y above the rounding floor)."""


def check_input(x: object) -> torch.Tensor:
    """x (B, C, *) -> (B, C, n) with n = prod(*). Finiteness is checked by the solver, from the
    mean it computes anyway (``checks.check_finite_by``): one pass over x fewer."""
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


def solve_options(
    *,
    dtype: torch.dtype,
    device: torch.device,
    tol: float | None,
    max_iter: int,
    newton: bool,
    restarts: int,
    implicit_solver: str,
    check_every: int | None,
) -> SolveOptions:
    if tol is None:
        tol = DEFAULT_TOL[dtype]
    tol = check_positive(tol, "tol")
    if not isinstance(newton, bool):
        raise ValueError(f"newton must be True or False, got {newton!r}")
    if check_every is None:
        # each check is a host sync: cheap on a CPU, a pipeline stall on a GPU
        check_every = 1 if device.type == "cpu" else 8
    return SolveOptions(
        tol=tol,
        max_iter=check_int(max_iter, "max_iter", minimum=1),
        newton=newton,
        restarts=check_int(restarts, "restarts", minimum=0),
        implicit_solver=check_choice(implicit_solver, "implicit_solver", SOLVERS),
        check_every=check_int(check_every, "check_every", minimum=1),
    )
