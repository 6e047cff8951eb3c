"""Deep declarative layers with structured implicit backward passes.

Public API (fixed; see DESIGN.md)::

    import ddn_layers as ddn
    P = ddn.sinkhorn(M, r=None, c=None, gamma=10.0, backward_mode="implicit")
    ot = ddn.OptimalTransport(gamma=10.0, backward_mode="implicit")
    y = ddn.robust_pool(x, penalty="pseudo-huber", alpha=1.0, backward_mode="implicit")
    pool = ddn.RobustPool2d(penalty="welsch", alpha=1.0, backward_mode="implicit")
    ddn.BackwardMode, ddn.PENALTIES
    y = ddn.argmin(objective, x, constraints=h, solver=solve)   # your own node (generic)
    node = ddn.DeclarativeNode(objective, constraints=h, solver=solve)
"""

from ddn_layers.base import DeclarativeLayer, SolverInfo
from ddn_layers.checks import ConvergenceWarning, IllConditionedWarning
from ddn_layers.generic import DeclarativeNode, argmin
from ddn_layers.modes import BackwardMode
from ddn_layers.ot import OptimalTransport, sinkhorn
from ddn_layers.pooling import PENALTIES, RobustPool2d, robust_pool

__all__ = [
    "BackwardMode",
    "ConvergenceWarning",
    "DeclarativeLayer",
    "DeclarativeNode",
    "IllConditionedWarning",
    "OptimalTransport",
    "PENALTIES",
    "RobustPool2d",
    "SolverInfo",
    "argmin",
    "robust_pool",
    "sinkhorn",
]
