"""The one list of backward modes shared by every declarative layer."""

from __future__ import annotations

from enum import Enum


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
