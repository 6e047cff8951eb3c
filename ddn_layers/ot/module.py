"""``OptimalTransport``: the entropic optimal transport layer as a module."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from ddn_layers.base import DeclarativeLayer
from ddn_layers.modes import BackwardMode
from ddn_layers.ot.function import sinkhorn_with_options
from ddn_layers.ot.options import OTOptions


class OptimalTransport(DeclarativeLayer):
    """Entropic optimal transport as a module: ``ot(M, r=None, c=None) -> P`` (log P with
    ``log_plan=True``).

    Shapes: M (B, m, n) or (m, n); r (m,) or (B, m); c (n,) or (B, n); P like M.
    ``last_info`` holds the per-sample iterations and residuals of the latest call.
    See :func:`sinkhorn` for the arguments. The options are checked once, here; each is also
    an attribute (``ot.gamma``, ...), checked again when assigned.
    """

    def __init__(
        self,
        gamma: float = 10.0,
        tol: float = 1e-6,
        max_iter: int = 1000,
        backward_mode: BackwardMode | str = BackwardMode.IMPLICIT,
        implicit_solver: str = "auto",
        check_every: int = 10,
        warn: bool = True,
        marginal_penalty: float | tuple[float, float] | None = None,
        log_plan: bool = False,
    ) -> None:
        super().__init__(backward_mode)
        self.options = OTOptions(
            gamma=gamma,
            tol=tol,
            max_iter=max_iter,
            implicit_solver=implicit_solver,
            check_every=check_every,
            warn=warn,
            marginal_penalty=marginal_penalty,
            log_plan=log_plan,
        )

    def forward(self, M: Tensor, r: Tensor | None = None, c: Tensor | None = None) -> Tensor:
        P, self.last_info = sinkhorn_with_options(M, r, c, self.backward_mode, self.options)
        return P

    def extra_repr(self) -> str:
        o = self.options
        unbalanced = (
            "" if o.marginal_penalty is None else f", marginal_penalty={o.marginal_penalty}"
        )
        log = ", log_plan=True" if o.log_plan else ""
        return (
            f"gamma={o.gamma}, tol={o.tol}, max_iter={o.max_iter}, "
            f"backward_mode={self.backward_mode.value}, implicit_solver={o.implicit_solver}"
            f"{unbalanced}{log}"
        )


def _option_attribute(name: str) -> property:
    def get(self: OptimalTransport):
        return getattr(self.options, name)

    def set_(self: OptimalTransport, value) -> None:
        self.options = dataclasses.replace(self.options, **{name: value})

    return property(get, set_, doc=f"The ``{name}`` option (checked when assigned).")


for _name in OTOptions.defaults():
    setattr(OptimalTransport, _name, _option_attribute(_name))
