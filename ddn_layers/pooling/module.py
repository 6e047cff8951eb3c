"""``RobustPool2d``: the layer as a module, a drop-in for global average pooling + flatten."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ddn_layers.base import DeclarativeLayer
from ddn_layers.checks import check_positive
from ddn_layers.modes import BackwardMode
from ddn_layers.pooling.function import pool_with_options
from ddn_layers.pooling.options import PoolOptions, check_input
from ddn_layers.pooling.penalties import Penalty, get_penalty


class RobustPool2d(DeclarativeLayer):
    """Global robust pooling of a feature map: (B, C, H, W) -> (B, C).

    Replaces ``nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())``; with
    ``penalty="quadratic"`` it computes exactly that. See :func:`robust_pool` for the
    penalties, backward modes and ``**options`` (``PoolOptions.defaults()``: tol, max_iter,
    newton, restarts, implicit_solver, check_every).

    Args:
        penalty: a name in ``ddn.PENALTIES`` or a :class:`Penalty`.
        alpha: the penalty's scale (> 0). An ``nn.Parameter`` is used as given (trained as
            is; it must stay positive).
        backward_mode: ``implicit``, ``full``, ``approx`` or ``unroll``; may be reassigned.
        learn_alpha: learn alpha, parametrised as exp(log_alpha) so that it stays positive.

    After each forward, ``last_info`` holds the solver's per-sample :class:`SolverInfo`.
    """

    def __init__(
        self,
        penalty: str | Penalty = "pseudo-huber",
        alpha: float | Tensor = 1.0,
        backward_mode: BackwardMode | str = BackwardMode.IMPLICIT,
        *,
        learn_alpha: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(backward_mode)
        self.penalty = get_penalty(penalty)
        a = check_positive(alpha, "alpha")
        learnable = isinstance(alpha, Tensor) and alpha.requires_grad
        if learnable and not isinstance(alpha, nn.Parameter):
            # a module holds parameters, buffers and numbers: a copy of this tensor would
            # silently stop it from being learned
            raise ValueError(
                "alpha: a tensor that requires grad is not trained by a module; pass "
                "nn.Parameter(alpha) (used as given) or learn_alpha=True"
            )
        if isinstance(alpha, nn.Parameter):
            self.alpha_param = alpha
        elif learn_alpha:
            self.log_alpha = nn.Parameter(torch.tensor(math.log(a)))
        else:
            self.register_buffer("alpha_value", torch.tensor(a), persistent=False)
        # bad options fail here, at construction, rather than at the first batch
        self.options = PoolOptions.from_kwargs(**options)

    @property
    def alpha(self) -> Tensor:
        if hasattr(self, "alpha_param"):
            return self.alpha_param
        if hasattr(self, "log_alpha"):
            return self.log_alpha.exp()
        return self.alpha_value

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> y (B, C)."""
        if isinstance(x, Tensor) and x.dim() != 4:
            raise ValueError(f"x must have 4 dimensions (B, C, H, W), got shape {tuple(x.shape)}")
        y, self.last_info = pool_with_options(
            check_input(x),
            self.penalty,
            self.alpha,
            self.backward_mode,
            self.options,
            return_info=True,
        )
        return y

    def extra_repr(self) -> str:
        alpha = float(self.alpha.detach())
        learn = ", learn_alpha" if self.alpha.requires_grad else ""
        return f"penalty={self.penalty.name}, alpha={alpha:g}{learn}, {super().extra_repr()}"
