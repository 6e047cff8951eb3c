"""Solves with the pooling Hessian H = s I + D diag(k2) D^T, s = sum_i k1_i (Eq. 8 summed).

D (C x n) holds the offsets y - x_i as columns. H is never inverted and, on the structured
paths, never formed densely when a smaller system will do:

- ``diagonal``: k2 = 0 (quadratic, truncated quadratic), so H = s I;
- ``cholesky``: H formed in channel space (C x C, one GEMM) and factored, O(n C^2 + C^3);
- ``woodbury``: since k2 <= 0 (see penalties.py), H = s I - U U^T with U = D diag(q),
  q = sqrt(-k2), and H^-1 r = (r + U (s I_n - U^T U)^-1 U^T r) / s needs only an n x n
  Cholesky factor, O(n^2 C + n^3): 49 x 49 instead of 512 x 512 for a 7x7x512 feature map.

Only Cholesky routines are used: batched LU solves are unreliable on some CPU builds (see
DESIGN.md), and every well-posed system here is symmetric positive definite. A sample whose
factorisation fails, or whose smallest pivot is negligible against s, is reported as not
``ok``; its solution is set to zero and the caller decides what that means.

A pivot test alone misses Hessians that are singular in exact arithmetic, such as huber's
with every point beyond alpha on one line through y (two points farther apart than 2 alpha:
the minimiser is not unique). H is then s I minus terms that cancel s along one direction;
the rounding of that cancellation leaves an eigenvalue of a few eps s of either sign, which
Cholesky without pivoting can spread into pivots far above it. :func:`factor` therefore also
bounds the smallest eigenvalue by inverse iteration with the factor. The small eigenvalues of
H and of the Woodbury matrix coincide, so both routes, and ``full``, flag the same samples.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddn_layers.linalg import guarded_cholesky, smallest_eigenvalue_bound

SOLVERS = ("auto", "cholesky", "woodbury")

SINGULAR_MARGIN = 16.0
"""A Hessian whose smallest eigenvalue is below SINGULAR_MARGIN eps s counts as singular
(:func:`factor`): a few times the rounding left by the cancellation that forms H, where a
Hessian singular in exact arithmetic ends up."""


def choose_solver(requested: str, n: int, c: int, kappa2_zero: bool) -> str:
    """The cheapest exact solver: diagonal if k2 = 0, else the smaller of the two factors."""
    if kappa2_zero:
        return "diagonal"
    if requested == "auto":
        return "woodbury" if n < c else "cholesky"
    return requested


def factor(a: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Guarded Cholesky factors of the batch ``a`` (N, m, m) and which samples are usable.

    ``a`` is H or the Woodbury matrix. The diagonal of H is at most s (k2 <= 0), so a squared
    pivot below s m eps marks a direction singular at working precision; a sample with s <= 0
    (no weight at all) fails outright. So does one whose smallest eigenvalue is below
    ``SINGULAR_MARGIN`` eps s, the level at which the rounding of the cancellation that forms
    H leaves the eigenvalue of a Hessian singular in exact arithmetic (module docstring):
    there the "solution" is noise amplified by about 1 / eps. Failed factors are the identity
    (see ``linalg.guarded_cholesky``).
    """
    eps = torch.finfo(s.dtype).eps
    L, ok = guarded_cholesky(a, pivot_floor=torch.where(s > 0, s * (a.shape[-1] * eps), torch.inf))
    with torch.no_grad():
        ok = ok & (smallest_eigenvalue_bound(L.detach()) > (SINGULAR_MARGIN * eps) * s)
    return L, ok


def hessian_solve(
    d: Tensor, k1: Tensor, k2: Tensor, rhs: Tensor, solver: str
) -> tuple[Tensor, Tensor]:
    """w = H^-1 rhs for each sample, and whether H was (numerically) positive definite.

    Args:
        d: offsets y - x_i, shape (N, C, n).
        k1, k2: curvature terms, shape (N, n) (any common positive per-sample scale).
        rhs: shape (N, C).
        solver: ``diagonal``, ``cholesky`` or ``woodbury`` (see :func:`choose_solver`).

    Returns:
        ``w`` of shape (N, C) (zero where not ok) and ``ok`` of shape (N,).
    """
    routes = {"diagonal": _diagonal, "cholesky": _channel_space, "woodbury": _woodbury}
    if solver not in routes:
        raise ValueError(f"implicit_solver must be one of {list(SOLVERS)}, got {solver!r}")
    w, ok = routes[solver](d, k1, k2, rhs, k1.sum(-1))
    return torch.where(ok[:, None], w, torch.zeros_like(w)), ok


def _diagonal(d: Tensor, k1: Tensor, k2: Tensor, rhs: Tensor, s: Tensor):
    """H = s I (k2 = 0)."""
    ok = s > 0
    return rhs / torch.where(ok, s, torch.ones_like(s))[:, None], ok


def _channel_space(d: Tensor, k1: Tensor, k2: Tensor, rhs: Tensor, s: Tensor):
    """H formed (C x C) and factored."""
    N, c, n = d.shape
    H = torch.diag_embed(s[:, None].expand(-1, c))
    # sum_i k2_i d_i d_i^T, a block of points at a time: the scaled copy of the offsets is
    # then a small temporary instead of a second (C, n) array, which would dominate the peak
    block = max(1, (1 << 16) // (N * c))
    for i in range(0, n, block):
        di = d[:, :, i : i + block]
        H = torch.baddbmm(H, di * k2[:, None, i : i + block], di.mT)
    L, ok = factor(H, s)
    return torch.cholesky_solve(rhs[:, :, None], L)[:, :, 0], ok


def _woodbury(d: Tensor, k1: Tensor, k2: Tensor, rhs: Tensor, s: Tensor):
    """H = s I - U U^T solved through the n x n matrix s I - U^T U."""
    # U^T U = diag(q) D^T D diag(q) with q = sqrt(-k2): only the n x n Gram matrix of the
    # offsets is formed, never U itself
    n = d.shape[2]
    # sqrt has an infinite derivative at 0, where k2 is 0 (huber inside its radius) or has
    # underflowed (pseudo-huber beyond ~1e12 alpha in float32): under autograd (unroll) that
    # inf times a zero gradient is NaN, so the root is taken of 1 there
    neg = k2 < 0
    q = torch.where(neg, torch.sqrt(torch.where(neg, -k2, 1.0)), 0.0)
    S = torch.diag_embed(s[:, None].expand(-1, n)) - q[:, :, None] * (d.mT @ d) * q[:, None, :]
    L, ok = factor(S, s)
    t = torch.cholesky_solve((q * (rhs[:, None, :] @ d)[:, 0, :])[:, :, None], L)
    return (rhs + (d @ (q[:, :, None] * t))[:, :, 0]) / torch.where(ok, s, 1)[:, None], ok
