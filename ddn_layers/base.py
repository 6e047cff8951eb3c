"""What every declarative layer module shares, so that tools can find and inspect them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ddn_layers.modes import BackwardMode


@dataclass
class SolverInfo:
    """Per-sample record of the last forward solve (tensors of shape (B,), on the input device).

    ``iterations``: iterations each sample took; ``residual``: its final optimality or
    marginal error; ``converged``: whether it met the tolerance. ``extra`` holds
    layer-specific entries (for example which start won for non-convex pooling).
    """

    iterations: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Scalars for logging: mean/max iterations, max residual, fraction converged (syncs)."""
        it = self.iterations.float()
        return {
            "iters_mean": float(it.mean()),
            "iters_max": float(it.max()),
            "residual_max": float(self.residual.float().max()),
            "converged_frac": float(self.converged.float().mean()),
        }


class DeclarativeLayer(nn.Module):
    """Base of the layer modules: a backward mode and the record of the last forward solve.

    Profiling callbacks find layers by ``isinstance(m, DeclarativeLayer)``; ``last_info`` is the
    :class:`SolverInfo` of the most recent forward call (None before the first).
    """

    def __init__(self, backward_mode: BackwardMode | str = BackwardMode.IMPLICIT) -> None:
        super().__init__()
        self.backward_mode = backward_mode
        self.last_info: SolverInfo | None = None

    @property
    def backward_mode(self) -> BackwardMode:
        return self._backward_mode

    @backward_mode.setter
    def backward_mode(self, mode: BackwardMode | str) -> None:
        # a run-wide switch may assign a plain string: parse (and reject) it here, at once,
        # rather than at the next forward
        self._backward_mode = BackwardMode.parse(mode)

    def extra_repr(self) -> str:
        return f"backward_mode={self.backward_mode.value}"
