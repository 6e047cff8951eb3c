"""Robust vector pooling (Gould et al., "Two Case Studies", Eqs. 4-10): a declarative layer.

``robust_pool(x, penalty, alpha)`` maps features x (B, C, *) to y (B, C), the minimiser of
sum_i phi(||y - x_i||; alpha) over the points of each sample; ``RobustPool2d`` is its module.

Files, one job each: ``penalties`` (Table 1), ``linalg`` (structured Hessian solves),
``solver`` (batched IRLS + safeguarded Newton forward), ``median`` (its median start),
``backward`` (implicit, full and approx vector-Jacobian products), ``function`` (the
autograd.Function and the functional), ``module`` (``RobustPool2d``), ``options`` (argument
checks).
"""

from ddn_layers.pooling.function import robust_pool
from ddn_layers.pooling.module import RobustPool2d
from ddn_layers.pooling.penalties import PENALTIES, Penalty

__all__ = ["PENALTIES", "Penalty", "RobustPool2d", "robust_pool"]
