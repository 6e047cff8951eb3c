"""The Schur complement solvers of the implicit backward, and linalg's fused CG for operators
diag(d) - Q^T Q that one of them runs on."""

from __future__ import annotations

import torch

import ddn_layers as ddn
from ddn_layers.linalg import diagonal_minus_gram_cg
from ddn_layers.ot import schur
from tests.ddn_layers.testing import F64


def _operator(B, m, n, seed, absent=()):
    """d, Q with diag(d) - Q^T Q positive definite (a margin of 0.5 on the diagonal), Q of
    both signs; the entries ``absent`` have d = 0 and a zero column of Q."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(B, m, n, generator=g, dtype=F64) / m**0.5
    Q[..., list(absent)] = 0
    # diag(d) - Q^T Q >= 0.5 I where d >= ||Q||^2 + 0.5 (Gershgorin on Q^T Q)
    d = Q.square().sum(-2) + (Q.mT @ Q).abs().sum(-1) + 0.5
    d[..., list(absent)] = 0
    return d, Q


def test_diagonal_minus_gram_cg_solves_the_system():
    d, Q = _operator(3, 7, 6, seed=0, absent=(4,))
    b = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    b[..., 4] = 0
    A = torch.diag_embed(d) - Q.mT @ Q
    A[:, 4, 4] = 1.0  # the absent entry: an identity row for the reference solve
    want = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)
    for gram_diagonal in (None, Q.square().sum(-2)):
        res = diagonal_minus_gram_cg(
            d, Q.clone(), b, rtol=1e-12, max_iter=50, gram_diagonal=gram_diagonal
        )
        assert bool(res.converged.all()) and res.iterations <= 50
        torch.testing.assert_close(res.x, want, rtol=1e-9, atol=1e-12)
        assert bool((res.x[..., 4] == 0).all())


def test_diagonal_minus_gram_cg_gives_up_when_its_rate_predicts_a_miss():
    """A system CG needs many iterations for: with a budget far below that it stops early,
    unconverged, rather than spending the whole budget."""
    d, Q = _operator(1, 80, 80, seed=2)
    d = Q.square().sum(-2) + (Q.mT @ Q).abs().sum(-1) * 1e-3  # barely positive definite
    b = torch.randn(1, 80, generator=torch.Generator().manual_seed(3), dtype=F64)
    full = diagonal_minus_gram_cg(d, Q.clone(), b, rtol=1e-12, max_iter=40)
    early = diagonal_minus_gram_cg(d, Q.clone(), b, rtol=1e-12, max_iter=40, give_up=True)
    assert not bool(full.converged.any()) and full.iterations == 40
    assert not bool(early.converged.any()) and early.iterations < 40


def test_schur_solvers_agree():
    """The direct and the CG solve of S b = rhs give the same b on a padded problem."""
    M = torch.randn(2, 30, 25, generator=torch.Generator().manual_seed(4), dtype=F64)
    c = torch.ones(2, 25, dtype=F64)
    c[:, -3:] = 0
    P = ddn.sinkhorn(M, None, c, gamma=5.0, tol=1e-12, max_iter=100_000)
    V = torch.randn_like(P)
    r, c = P.sum(-1), P.sum(-2)
    X = P * V
    rinv, rhs = schur.schur_rhs(P, r, X.sum(-1), X.sum(-2))
    direct, ok = schur.solve_schur_cholesky(P, c, rhs, rinv, X.clone())
    iterative, converged, _ = schur.solve_schur_cg(P, c, rhs, rinv, X.clone(), 1e-12, 200)
    assert bool(ok.all()) and bool(converged.all())
    # S is singular (null vector: the real columns): compare b up to that gauge
    q = (c > 0).to(F64)
    gauge = ((direct - iterative) * q).sum(-1, keepdim=True) / q.sum(-1, keepdim=True)
    torch.testing.assert_close(direct, (iterative + gauge) * q, rtol=1e-7, atol=1e-10)
