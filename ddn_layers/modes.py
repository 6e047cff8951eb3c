"""The one list of backward modes shared by every declarative layer."""

from __future__ import annotations

from enum import Enum

import torch


class BackwardMode(str, Enum):
    """How a declarative layer computes its backward pass.

    Every layer accepts the same four names; a solver variant is an option of a mode
    (``implicit_solver=...``), never a new mode.
    """

    IMPLICIT = "implicit"
    """Implicit differentiation that exploits the problem's structure (fast, lean)."""
    FULL = "full"
    """Implicit differentiation with dense, unstructured algebra: Eq. 3 as written."""
    APPROX = "approx"
    """A cheap approximation of the implicit gradient (see each layer)."""
    UNROLL = "unroll"
    """Autograd through the forward solver's iterations."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def choices(cls) -> list[str]:
        return [m.value for m in cls]

    @classmethod
    def parse(cls, value: BackwardMode | str, name: str = "backward_mode") -> BackwardMode:
        """Return the mode for ``value``, or raise ValueError naming ``name`` and the choices."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        raise ValueError(f"{name} must be one of {cls.choices()}, got {value!r}")


def first_derivatives_only(layer: str, mode: BackwardMode, instead: str) -> None:
    """RuntimeError if a backward that gives first derivatives only runs under create_graph.

    Autograd runs a backward with grad mode on exactly when its caller asked for the graph
    of the gradient (``create_graph=True``: a gradient penalty, a Hessian-vector product). A
    gradient computed without a graph would then enter that graph as a constant, and every
    second derivative through the layer would come back zero without a word
    (``once_differentiable`` raises only when the incoming gradient itself requires grad,
    which that of ``y.sum()`` does not). ``instead`` names the modes that do differentiate
    twice.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{layer}: backward_mode={mode.value} gives first derivatives only, but this "
            f"backward runs with create_graph=True, which differentiates them again; {instead}"
        )
