"""The user's problem, bound to one batch of inputs, and the checks on what the user's functions
return.

A node is defined per sample b by

    y_b = argmin_u f(x_b, u)   subject to   h(x_b, u) = 0,

written batched: ``objective(*xs, y) -> (B,)``, ``constraints(*xs, y) -> (B, p)``. Every
input and the output carry the batch on their first axis, and sample b of the objective and
constraints may read only sample b of the inputs and of y. That separability is what lets
one vector-Jacobian product of the batch sum serve all samples at once: the Hessian of
sum_b f_b is block diagonal, one block per sample.

Inside the library y is handled flat, (B, m) with m = prod(y.shape[1:]); the user's functions
always see it in the shape their solver returned.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, vjp

from ddn_layers.base import SolverInfo


@dataclass(frozen=True)
class Problem:
    """A declarative node's definition; see :func:`ddn_layers.argmin` for each field."""

    objective: Callable[..., Tensor]
    constraints: Callable[..., Tensor] | None = None
    solver: Callable[..., Tensor | tuple[Tensor, SolverInfo]] | None = None
    init: Callable[..., Tensor] | None = None
    hessian_approx: Callable[..., Tensor] | None = None

    @property
    def constrained(self) -> bool:
        return self.constraints is not None


def make_problem(objective, constraints, solver, init, hessian_approx) -> Problem:
    """Check the definition itself: what is missing or contradictory fails before any solve."""
    for name, fn in [
        ("objective", objective),
        ("constraints", constraints),
        ("solver", solver),
        ("init", init),
        ("hessian_approx", hessian_approx),
    ]:
        if fn is not None and not callable(fn):
            raise ValueError(f"{name} must be callable, got {type(fn).__name__}")
    if objective is None:
        raise ValueError("objective must be given: objective(*inputs, y) -> (B,)")
    if solver is not None and init is not None:
        raise ValueError(
            "give either solver (your own forward) or init (the start of the default Newton-CG "
            "solver), not both"
        )
    if solver is None and constraints is not None:
        raise ValueError(
            "a constrained node needs solver=...: the default Newton-CG solver handles "
            "unconstrained problems only"
        )
    if solver is None and init is None:
        raise ValueError(
            "give solver=solve(*inputs) -> y, or init=init(*inputs) -> y0 to start the "
            "default Newton-CG solver (it also fixes the shape of y)"
        )
    return Problem(objective, constraints, solver, init, hessian_approx)


def check_inputs(inputs: Sequence[object]) -> tuple[int, torch.dtype]:
    """The batch size and the floating dtype shared by the inputs (ValueError otherwise)."""
    if not inputs:
        raise ValueError("a declarative node needs at least one input tensor")
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            raise ValueError(
                f"input {i} must be a torch.Tensor, got {type(x).__name__}; close over "
                "constants in your functions instead (functools.partial, a lambda)"
            )
        if x.dim() == 0:
            raise ValueError(
                f"input {i} is a 0-d tensor: every input needs the batch on its first axis "
                "(expand a shared parameter, e.g. alpha.expand(B); autograd sums its gradient)"
            )
    B = inputs[0].shape[0]
    for i, x in enumerate(inputs):
        if x.shape[0] != B:
            raise ValueError(
                f"input {i} has shape {tuple(x.shape)}, but input 0 has batch size {B}: every "
                f"input needs the batch on its first axis (expand a shared one, x.expand({B}, "
                "...))"
            )
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"input {i} contains NaN or infinite values")
    floats = [x.dtype for x in inputs if x.is_floating_point()]
    if not floats:
        raise ValueError("at least one input must be a floating-point tensor")
    return B, functools.reduce(torch.promote_types, floats)


def _shape(t: object) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def check_solution(y: object, B: int, who: str) -> Tensor:
    if not isinstance(y, Tensor) or not y.is_floating_point():
        raise ValueError(f"{who} must return a floating-point tensor y, got {_shape(y)}")
    if y.dim() == 0 or y.shape[0] != B:
        raise ValueError(
            f"{who} must return y with the batch size {B} on its first axis, got shape "
            f"{tuple(y.shape)}"
        )
    if y.numel() == 0:
        raise ValueError(f"{who} returned an empty y of shape {tuple(y.shape)}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{who} returned NaN or infinite values in y")
    return y


def check_objective_value(value: object, B: int) -> Tensor:
    if not isinstance(value, Tensor) or value.shape != (B,):
        hint = " (one value per sample: sum over every axis but the first)"
        if isinstance(value, Tensor) and value.dim() == 0:
            hint = " (a scalar: keep the batch axis, e.g. .sum(-1) rather than .sum())"
        raise ValueError(
            f"objective must return one value per sample, shape ({B},), got {_shape(value)}{hint}"
        )
    return value


def check_constraint_value(value: object, B: int) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() not in (1, 2) or value.shape[0] != B:
        raise ValueError(
            f"constraints must return shape ({B}, p) (or ({B},) for one constraint), got "
            f"{_shape(value)}"
        )
    return value if value.dim() == 2 else value.unsqueeze(-1)


class Bound:
    """The problem at fixed inputs xs, as functions of the flat output y (B, m).

    ``lam`` (B, p) are the Lagrange multipliers at the solution, held constant: the Hessian
    and mixed derivatives of Eq. 3 are those of the Lagrangian L = f - lam^T h.
    """

    def __init__(self, problem: Problem, xs: Sequence[Tensor], y_shape: torch.Size) -> None:
        self.problem = problem
        self.xs = tuple(xs)
        self.y_shape = y_shape
        self.B = y_shape[0]
        self.m = y_shape[1:].numel()

    def unflat(self, y: Tensor) -> Tensor:
        return y.reshape(self.y_shape)

    def f(self, y: Tensor, xs: Sequence[Tensor] | None = None) -> Tensor:
        return self.problem.objective(*(self.xs if xs is None else xs), self.unflat(y))

    def h(self, y: Tensor, xs: Sequence[Tensor] | None = None) -> Tensor:
        out = self.problem.constraints(*(self.xs if xs is None else xs), self.unflat(y))
        return out if out.dim() == 2 else out.unsqueeze(-1)

    def lagrangian(self, y: Tensor, lam: Tensor | None, xs=None) -> Tensor:
        L = self.f(y, xs)
        if lam is not None:
            L = L - (lam * self.h(y, xs)).sum(-1)
        return L

    def grad_lagrangian(self, y: Tensor, lam: Tensor | None, xs=None) -> Tensor:
        """grad_y L (B, m): per sample, since L's batch sum is separable."""
        return grad(lambda u: self.lagrangian(u, lam, xs).sum())(y)

    def hvp(self, y: Tensor, lam: Tensor | None) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """grad_y L at y, and v -> H v, linearised once so that each product is one backward
        pass through the gradient's graph (H is symmetric, so its vjp is its jvp)."""
        g, pullback = vjp(lambda u: self.grad_lagrangian(u, lam), y)
        return g, lambda v: pullback(v)[0]

    def constraint_ops(self, y: Tensor) -> tuple[Callable, Callable]:
        """z -> A^T z (B, p) -> (B, m), and w -> A w (B, m) -> (B, p), with A = D_y h.

        A w comes from the vjp of the linear map z -> A^T z rather than from a jvp of h:
        reverse mode only, so a user function needs no forward-mode derivatives.
        """
        h0, pullback = vjp(self.h, y)

        def At(z: Tensor) -> Tensor:
            return pullback(z)[0]

        _, transpose = vjp(At, torch.zeros_like(h0))

        def A(w: Tensor) -> Tensor:
            return transpose(w)[0]

        return At, A
