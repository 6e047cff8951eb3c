"""Robust vector pooling (Gould et al., "Two Case Studies", Eqs. 4-10): a declarative layer.

``robust_pool(x, penalty, alpha)`` maps features x (B, C, *) to y (B, C), the minimiser of
sum_i phi(||y - x_i||; alpha) over the points of each sample; ``RobustPool2d`` is its module.

The skeleton's files (see ``ddn_layers/base.py``): ``options`` (``PoolOptions`` and the
argument checks), ``solver`` (batched IRLS + safeguarded Newton forward), ``backward`` (the
implicit, full and approx vector-Jacobian products, in ``BACKWARDS``), ``function`` (the
``LayerSpec`` and the functional), ``module`` (``RobustPool2d``). The layer's own maths:
``penalties`` (Table 1), ``hessian`` (structured Hessian solves), ``points`` (the points,
centred, as the solver reads them), ``median`` (the median start).
"""

from ddn_layers.pooling.function import robust_pool
from ddn_layers.pooling.module import RobustPool2d
from ddn_layers.pooling.penalties import PENALTIES, Penalty

__all__ = ["PENALTIES", "Penalty", "RobustPool2d", "robust_pool"]
