"""Unbalanced entropic optimal transport (soft marginals at a KL price), reached through
``ddn.sinkhorn(..., marginal_penalty=rho)``: its own options, solver, backward table and spec
on the layer skeleton."""

from ddn_layers.ot.unbalanced.function import SPEC, unbalanced_with_options
from ddn_layers.ot.unbalanced.options import UnbalancedOptions, check_marginal_penalty
from ddn_layers.ot.unbalanced.solver import UnbalancedSolution, solve_annealed, solve_unbalanced

__all__ = [
    "SPEC",
    "UnbalancedOptions",
    "UnbalancedSolution",
    "check_marginal_penalty",
    "solve_annealed",
    "solve_unbalanced",
    "unbalanced_with_options",
]
