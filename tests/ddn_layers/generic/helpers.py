"""Problems shared by the generic-node tests: the examples, entropic OT, a constrained QP."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import ddn_layers as ddn
from tests.ddn_layers.testing import F64

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ("robust_pooling", "sphere_projection")
TIGHT = 1e-13
"""Newton-CG (and pooling) tolerance where y must be exact to rounding: finite differences
and cross-checks against the built-in layers."""


def load_example(name: str):
    """The example script as a module (its ``main`` does not run)."""
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", ROOT / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ot_node(gamma: float, **options) -> ddn.DeclarativeNode:
    """Entropic OT as the issue states it: <P, M> + (1/gamma) sum P (log P - 1), row sums r
    (the first dropped: it is implied by the others) and column sums c; Sinkhorn as solver."""

    def objective(M, r, c, P):
        return (P * M).sum((1, 2)) + (P * (P.log() - 1)).sum((1, 2)) / gamma

    def constraints(M, r, c, P):
        return torch.cat([P.sum(2)[:, 1:] - r[:, 1:], P.sum(1) - c], -1)

    def solve(M, r, c):
        return ddn.sinkhorn(M, r, c, gamma=gamma, tol=1e-14, max_iter=100_000)

    def hessian(M, r, c, P):  # exact: the entropy's Hessian is diagonal
        return 1.0 / (gamma * P)

    return ddn.DeclarativeNode(
        objective, constraints, solver=solve, hessian_approx=hessian, **options
    )


def ot_problem(B, m, n, seed=0):
    """Cost and normalised, strictly positive marginals (the generic constraints take r and c
    as they are, so they must already have equal mass)."""
    g = torch.Generator().manual_seed(seed)
    M = torch.rand(B, m, n, generator=g, dtype=F64)
    r = torch.rand(B, m, generator=g, dtype=F64) + 0.2
    c = torch.rand(B, n, generator=g, dtype=F64) + 0.2
    return M, r / r.sum(-1, keepdim=True), c / c.sum(-1, keepdim=True)


def qp_node(**options) -> ddn.DeclarativeNode:
    """min 1/2 y^T Q y - q^T y  s.t.  C y = d, with Q = L L^T + I: every input enters B or C,
    H = Q is dense, and the closed-form solver is differentiable (so ``unroll`` applies)."""

    def objective(q, L, C, d, y):
        Q = L @ L.mT + torch.eye(L.shape[-1], dtype=L.dtype)
        return 0.5 * (y * (Q @ y.unsqueeze(-1)).squeeze(-1)).sum(-1) - (q * y).sum(-1)

    def constraints(q, L, C, d, y):
        return (C @ y.unsqueeze(-1)).squeeze(-1) - d

    def solve(q, L, C, d):
        Q = L @ L.mT + torch.eye(L.shape[-1], dtype=L.dtype)
        F = torch.linalg.cholesky(Q)
        Qi_q = torch.cholesky_solve(q.unsqueeze(-1), F)
        Qi_Ct = torch.cholesky_solve(C.mT, F)
        S = torch.linalg.cholesky(C @ Qi_Ct)
        nu = torch.cholesky_solve(d.unsqueeze(-1) - C @ Qi_q, S)
        return (Qi_q + Qi_Ct @ nu).squeeze(-1)

    return ddn.DeclarativeNode(objective, constraints, solver=solve, **options)


def qp_problem(B=2, m=4, p=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(*shape, generator=g, dtype=F64)
        for shape in [(B, m), (B, m, m), (B, p, m), (B, p)]
    )
