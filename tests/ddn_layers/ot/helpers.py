"""Problem builders and constants shared by the optimal transport tests."""

from __future__ import annotations

import torch

from tests.ddn_layers.testing import F64


def problem(B, m, n, *, uniform=False, dtype=F64, scale=1.0, seed=0, kind="rand"):
    """A cost and strictly positive marginals (unnormalised on purpose)."""
    g = torch.Generator().manual_seed(seed)
    draw = torch.rand if kind == "rand" else torch.randn
    M = scale * draw(B, m, n, generator=g, dtype=dtype)
    if uniform:
        return M, None, None
    r = torch.rand(B, m, generator=g, dtype=dtype) + 0.2
    c = torch.rand(B, n, generator=g, dtype=dtype) + 0.2
    return M, r, c


def pad(M, r, c, extra_rows, extra_cols, value=3.0):
    """Append padded rows/columns (zero marginal, arbitrary cost) to a batched problem."""
    B, m, n = M.shape
    r = torch.cat([r, r.new_zeros(B, extra_rows)], -1)
    c = torch.cat([c, c.new_zeros(B, extra_cols)], -1)
    M = torch.cat([M, M.new_full((B, extra_rows, n), value)], 1)
    M = torch.cat([M, M.new_full((B, m + extra_rows, extra_cols), value)], 2)
    return M, r, c


TIGHT = dict(tol=1e-13, max_iter=100_000)
"""Solver options for results exact to ~1e-13 (finite differences, references)."""
