"""``DeclarativeNode``: a declarative node from an objective and constraints, as a module."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

from torch import Tensor

from ddn_layers.base import DeclarativeLayer
from ddn_layers.generic.function import argmin_with_options
from ddn_layers.generic.options import ArgminOptions
from ddn_layers.generic.problem import make_problem
from ddn_layers.modes import BackwardMode


class DeclarativeNode(DeclarativeLayer):
    """A declarative node as a module: ``node(*inputs) -> y``; see :func:`argmin`.

    Example (robust pooling with the pseudo-Huber penalty, default Newton-CG forward)::

        def objective(x, y):  # x (B, C, n) points, y (B, C)
            z2 = ((y.unsqueeze(-1) - x) ** 2).sum(1)
            return (torch.sqrt(1 + z2) - 1).sum(-1)

        pool = ddn.DeclarativeNode(objective, init=lambda x: x.mean(-1))
        y = pool(x)

    ``**options`` are those of :func:`argmin` (``ArgminOptions.defaults()``), checked here,
    at construction. ``backward_mode`` may be reassigned (a run-wide switch sets it on every
    layer); ``last_info`` holds the :class:`SolverInfo` of the latest call.
    """

    def __init__(
        self,
        objective: Callable[..., Tensor],
        constraints: Callable[..., Tensor] | None = None,
        *,
        solver: Callable[..., Tensor] | None = None,
        init: Callable[..., Tensor] | None = None,
        hessian_approx: Callable[..., Tensor] | None = None,
        backward_mode: BackwardMode | str = BackwardMode.IMPLICIT,
        **options: Any,
    ) -> None:
        super().__init__(backward_mode)
        self.problem = make_problem(objective, constraints, solver, init, hessian_approx)
        self.options = ArgminOptions.from_kwargs(**options)

    def forward(self, *inputs: Tensor) -> Tensor:
        y, self.last_info = argmin_with_options(
            self.problem, inputs, self.options, self.backward_mode
        )
        return y

    def extra_repr(self) -> str:
        parts = [f"backward_mode={self.backward_mode.value}"]
        parts += [
            f"{f.name}={getattr(self.options, f.name)!r}"
            for f in fields(self.options)
            if getattr(self.options, f.name) != f.default
        ]
        if self.problem.constrained:
            parts.append("constrained")
        return ", ".join(parts)
