"""Inputs and an independent reference shared by the robust pooling tests.

The reference re-implements the objective of Eq. 4 from Table 1 in NumPy and minimises it
with SciPy in float64; it shares no code with ``ddn_layers.pooling``.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
import torch

import ddn_layers as ddn
from tests.ddn_layers.testing import F64

PENALTY_NAMES = tuple(ddn.PENALTIES)
NON_CONVEX = tuple(name for name, p in ddn.PENALTIES.items() if not p.is_convex)
ITERATIVE = tuple(name for name, p in ddn.PENALTIES.items() if not p.closed_form)
"""Every penalty but the one whose minimiser is the mean in closed form."""
TIGHT = {"tol": 1e-13, "max_iter": 200}
"""Solver options for finite differences, which need y to ~1e-13."""


def clustered(B, C, n, *, alpha=1.0, outliers=0.2, dtype=F64, seed=0, spread=0.4):
    """Feature-map-like points: inliers within ``spread * alpha`` of a per-sample centre, a
    fraction ``outliers`` of them 4-8 alpha away, so no point sits near a kink at z = alpha."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(B, C, 1, generator=g, dtype=dtype)
    direction = torch.randn(B, C, n, generator=g, dtype=dtype)
    direction = direction / direction.norm(dim=1, keepdim=True)
    radius = spread * alpha * torch.rand(B, 1, n, generator=g, dtype=dtype)
    # a fixed number of outliers per sample, at random positions: the inliers stay the
    # majority, so the robust solution is theirs and well away from any kink
    rank = torch.rand(B, 1, n, generator=g).argsort(-1).argsort(-1)
    far = rank < int(outliers * n)
    radius = torch.where(far, (4.0 + 4.0 * radius) * alpha, radius)
    return centre + radius * direction


def np_phi(name, z, alpha):
    """Table 1, written again: the reference must not share code with the library."""
    if name == "quadratic":
        return 0.5 * z**2
    if name == "pseudo-huber":
        return alpha**2 * (np.sqrt(1.0 + (z / alpha) ** 2) - 1.0)
    if name == "huber":
        return np.where(z <= alpha, 0.5 * z**2, alpha * (z - 0.5 * alpha))
    if name == "welsch":
        return 1.0 - np.exp(-(z**2) / (2.0 * alpha**2))
    if name == "truncated-quadratic":
        return np.where(z <= alpha, 0.5 * z**2, 0.5 * alpha**2)
    raise KeyError(name)


def np_objective(name, X, y, alpha):
    """sum_i phi(||y - x_i||) for one sample X (C, n)."""
    return float(np_phi(name, np.linalg.norm(y[:, None] - X, axis=0), alpha).sum())


def reference_minimum(name, X, alpha, starts):
    """Lowest objective SciPy finds from ``starts`` (each (C,)), for one sample X (C, n)."""

    def f(y):
        return np_objective(name, X, y, alpha)

    best = np.inf
    for y0 in starts:
        # Nelder-Mead polish after BFGS: robust to the kinks of huber / truncated quadratic
        r = scipy.optimize.minimize(f, y0, method="BFGS", options={"gtol": 1e-12})
        r = scipy.optimize.minimize(
            f, r.x, method="Nelder-Mead", options={"xatol": 1e-12, "fatol": 1e-14}
        )
        best = min(best, r.fun, f(y0))
    return best
