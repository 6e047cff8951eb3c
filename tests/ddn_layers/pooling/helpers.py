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


def np_dphi(name, z, alpha):
    """phi'(z) and phi''(z) of Table 1, written again (z > 0 where the two pieces meet: the
    caller keeps away from z = alpha for huber and truncated quadratic)."""
    if name == "quadratic":
        return z, np.ones_like(z)
    if name == "pseudo-huber":
        r = 1.0 + (z / alpha) ** 2
        return z / np.sqrt(r), r**-1.5
    if name == "huber":
        inside = z <= alpha
        return np.where(inside, z, alpha), np.where(inside, 1.0, 0.0)
    if name == "welsch":
        e = np.exp(-(z**2) / (2.0 * alpha**2))
        return z * e / alpha**2, (1.0 - (z / alpha) ** 2) * e / alpha**2
    if name == "truncated-quadratic":
        inside = z <= alpha
        return np.where(inside, z, 0.0), np.where(inside, 1.0, 0.0)
    raise KeyError(name)


def np_hessian(name, X, y, alpha):
    """The Hessian of the objective at y for one sample X (C, n), and s = sum_i phi'(z_i) / z_i
    (its largest possible eigenvalue for these penalties): sum_i phi''(z_i) u_i u_i^T +
    phi'(z_i) / z_i (I - u_i u_i^T), u_i the unit offset, phi'(z) / z -> phi''(0) at z = 0."""
    d = y[:, None] - X
    z = np.linalg.norm(d, axis=0)
    d1, d2 = np_dphi(name, z, alpha)
    safe = np.where(z > 0, z, 1.0)
    k1 = np.where(z > 0, d1 / safe, d2)
    u = d / safe
    C = X.shape[0]
    H = sum(d2[i] * np.outer(u[:, i], u[:, i]) + k1[i] * (np.eye(C) - np.outer(u[:, i], u[:, i]))
            for i in range(X.shape[1]))  # fmt: skip
    return H, float(k1.sum())
