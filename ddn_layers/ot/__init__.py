"""Entropy-regularised optimal transport (Sinkhorn) with four backward modes."""

from ddn_layers.ot.annealed import solve_annealed
from ddn_layers.ot.function import sinkhorn
from ddn_layers.ot.module import OptimalTransport
from ddn_layers.ot.options import OTOptions
from ddn_layers.ot.solver import SinkhornSolution, solve_sinkhorn

__all__ = [
    "OTOptions",
    "OptimalTransport",
    "SinkhornSolution",
    "sinkhorn",
    "solve_annealed",
    "solve_sinkhorn",
]
