"""Generic declarative nodes: write the objective (and constraints), get the backward free.

The paper's closing advice is to implement a new node first with generic automatic
differentiation, test ideas with it, and check specialised code against it; this package is
that path. ``argmin(objective, *inputs, constraints=..., solver=...)`` and its module
``DeclarativeNode`` differentiate any twice-differentiable, equality-constrained problem with
the same four backward modes as the built-in layers.

Files, one job each: ``problem`` (the user's functions, bound to a batch, and the checks on
what they return), ``cg`` (batched conjugate gradients), ``kkt`` (Eq. 3 through the Schur
complement, and the Lagrange multipliers), ``implicit`` (the matrix-free ``implicit`` and
``approx`` backward), ``dense`` (the ``full`` backward), ``solvers`` (the default Newton-CG
forward), ``function`` (forward, optimality check, autograd.Function, warnings), ``options``,
``node`` (``argmin`` and ``DeclarativeNode``).
"""

from ddn_layers.generic.node import DeclarativeNode, argmin

__all__ = ["DeclarativeNode", "argmin"]
