"""Generic declarative nodes: write the objective (and constraints), get the backward free.

The paper's closing advice is to implement a new node first with generic automatic
differentiation, test ideas with it, and check specialised code against it; this package is
that path. ``argmin(objective, *inputs, constraints=..., solver=...)`` and its module
``DeclarativeNode`` differentiate any twice-differentiable, equality-constrained problem with
the same four backward modes as the built-in layers.

The layer skeleton (see ``ddn_layers.base``): ``options`` (``ArgminOptions``), ``solver``
(the user's solver or the default Newton-CG, then the optimality check and the multipliers),
``backward`` (one entry point per mode, the table ``BACKWARDS``), ``function`` (``argmin``),
``module`` (``DeclarativeNode``). The maths besides: ``problem`` (the user's functions, bound
to a batch, and the checks on what they return), ``kkt`` (Eq. 3 through the Schur complement,
and the Lagrange multipliers), ``implicit`` (the matrix-free ``implicit`` and ``approx``
backward), ``dense`` (the ``full`` backward), ``diagnostics`` (per-sample trouble, and its
warnings).
"""

from ddn_layers.generic.function import argmin
from ddn_layers.generic.module import DeclarativeNode

__all__ = ["DeclarativeNode", "argmin"]
