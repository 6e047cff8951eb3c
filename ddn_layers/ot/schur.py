"""The Schur complement of the Sinkhorn KKT matrix, solved on its column side.

    K = [[diag(r), P], [P^T, diag(c)]],   K [a; b] = [s_r; s_c]

(per sample, P (m, n), zeros in r, c = padding) is the system of every exact backward mode
(backward.py) and of the forward's Newton step (drift.py, where K is the Hessian of the dual
objective). Eliminating a leaves  S b = s_c - P^T (s_r / r)  with
S = diag(c) - P^T diag(1/r) P, PSD with the null vector 1 on the real columns (the gauge
(a + t, b - t)); then a = (s_r - P b) / r. S is solved by a Cholesky factorisation of its lower
triangle or matrix-free by Jacobi-preconditioned CG (``linalg.diagonal_minus_gram_cg``), CG
only where it can be trusted: not on tiny systems, and its solution checked afresh before use.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddn_layers.linalg import cholesky_solve_vectors, diagonal_minus_gram_cg, guarded_cholesky


def rowvec_mat(x: Tensor, P: Tensor) -> Tensor:
    """x^T P for x (B, m), P (B, m, n) -> (B, n)."""
    if P.stride(-1) != 1 and P.stride(-2) == 1:  # P = Q^T of a contiguous Q: (Q x)^T
        return torch.bmm(P.mT, x.unsqueeze(-1)).squeeze(-1)
    return torch.bmm(x.unsqueeze(-2), P).squeeze(-2)


def mat_vec(P: Tensor, y: Tensor) -> Tensor:
    """P y for P (B, m, n), y (B, n) -> (B, m).

    Both helpers pick the operand layout for which batched GEMV is fast: a row vector times a
    transposed matrix hits a much slower path for batch 1.
    """
    if P.stride(-1) != 1 and P.stride(-2) == 1:  # P = Q^T: (y^T Q)^T
        return torch.bmm(y.unsqueeze(-2), P.mT).squeeze(-2)
    return torch.bmm(P, y.unsqueeze(-1)).squeeze(-1)


def inv_or_zero(x: Tensor) -> Tensor:
    return torch.where(x > 0, 1.0 / torch.where(x > 0, x, 1.0), 0.0)


def schur_lower(Q: Tensor, block: int = 160) -> Tensor:
    """-Q^T Q (n x n) with only its lower-triangular blocks written (the rest is garbage).

    Cholesky and its solves read the lower triangle only, so this skips most of the upper
    half of the product when n is large.
    """
    B, _, n = Q.shape
    if n <= 2 * block:
        return torch.bmm(Q.mT, Q).neg_()
    S = Q.new_empty(B, n, n)
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        # one product for the block row left of (and including) the diagonal block
        torch.bmm(Q[:, :, i0:i1].mT, Q[:, :, :i1], out=S[:, i0:i1, :i1])
        S[:, i0:i1, :i1].neg_()
    return S


def schur_rhs(P: Tensor, r: Tensor, s_r: Tensor, s_c: Tensor) -> tuple[Tensor, Tensor]:
    """rinv = 1/r (0 on padding) and the right-hand side of the column-side system S b = rhs."""
    rinv = inv_or_zero(r)
    return rinv, s_c - rowvec_mat(rinv * s_r, P)


def solve_schur_cholesky(P, c, rhs, rinv, scratch, ridge=0.0) -> tuple[Tensor, Tensor]:
    """Direct solve of S b = rhs and per-sample success; ``ridge`` (relative to mean(c))
    regularises a singular S. ``scratch`` is an (m, n) buffer it overwrites."""
    q = (c > 0).to(P.dtype)
    torch.mul(P, rinv.sqrt().unsqueeze(-1), out=scratch)  # Q = diag(r)^-1/2 P
    S = schur_lower(scratch)
    diag = c + (1 - q)  # padded columns: identity rows
    if ridge:
        diag = diag + ridge * q * (c.sum(-1, keepdim=True) / q.sum(-1, keepdim=True).clamp_min(1))
    S.diagonal(dim1=-2, dim2=-1).add_(diag)
    # Gauge: S has the null vector q; adding delta q q^T with delta * n_valid = mean(c) makes it
    # SPD with an eigenvalue like the others there, and leaves the solution of S b = rhs (rhs
    # is orthogonal to q) unchanged.
    n_valid = q.sum(-1, keepdim=True).clamp_min(1)
    w = (c.sum(-1, keepdim=True).sqrt() / n_valid) * q
    S.baddbmm_(w.unsqueeze(-1), w.unsqueeze(-2))
    # only an outright failure counts: the gauge keeps the pivots of a regular S off zero
    L, ok = guarded_cholesky(S, pivot_floor=0.0)
    return cholesky_solve_vectors(L, rhs), ok


def solve_schur_cg(P, c, rhs, rinv, scratch, rtol, max_iter, give_up=False):
    """S b = rhs by Jacobi-preconditioned CG (``linalg.diagonal_minus_gram_cg``) with
    S = diag(c) - Q^T Q, Q = diag(r)^-1/2 P formed in ``scratch``; b, per-sample convergence
    and the iterations run. S is singular (null vector: the non-padded columns) but the
    system is consistent, so CG needs no gauge."""
    gram_diagonal = rowvec_mat(rinv, torch.mul(P, P, out=scratch))  # diag(P^T diag(rinv) P)
    Q = torch.mul(P, rinv.sqrt().unsqueeze(-1), out=scratch)
    res = diagonal_minus_gram_cg(
        c, Q, rhs, rtol=rtol, max_iter=max_iter, check_every=CG_CHECK_EVERY, give_up=give_up,
        gram_diagonal=gram_diagonal,
    )  # fmt: skip
    return res.x, res.converged, res.iterations


def cg_tol(dtype: torch.dtype) -> float:
    """Relative residual at which CG stops: in float32 the gradient then agrees with the
    direct solve's to within the error that float32 and the forward's tolerance already put
    in both (docs/benchmarks/ot/README.md, "Design notes")."""
    return 1e-10 if dtype == torch.float64 else 1e-5


def cg_budget(n_small: int, m_large: int) -> int:
    """CG iterations that cost as much as the direct solve (``implicit_solver="auto"``).

    A cost model in multiply-adds at the rate of a large matrix product: the direct solve
    forms the lower triangle of S (m n^2, slower per flop than a full product in blocks) and
    factorises it (n^3 / 3, slower still), plus call overheads; a CG iteration is two
    memory-bound matrix-vector products plus its vector operations, each with a fixed
    dispatch overhead. The constants are fitted (docs/benchmarks/ot/README.md, "Design
    notes"). Auto runs CG with this budget and gives up early when its rate predicts a miss,
    so a wrong guess costs a fraction of one direct solve.
    """
    direct = 1.66 * m_large * n_small**2 + n_small**3 + 1e7
    per_iteration = 48.0 * m_large * n_small + 8e6
    return int(direct / per_iteration)


CG_CHECK_EVERY = 5
"""Iterations between the Schur CG's convergence checks (``diagonal_minus_gram_cg``'s
default)."""

CG_RESIDUAL_SLACK = 100.0
"""How far above CG's own tolerance the recomputed residual of its solution may lie (see
:func:`kkt_residual_ok`)."""


def cg_trusted_size(c: Tensor) -> bool:
    """Whether every sample's system is large enough for CG: with k real unknowns (one of them
    the gauge) CG converges in k - 1 iterations, so a system with k <= ``CG_CHECK_EVERY``
    would keep stepping after convergence, along directions made of rounding noise, before its
    first check (there a curvature at rounding level gives steps of any size)."""
    return bool(((c > 0).sum(-1) > CG_CHECK_EVERY).all())


def kkt_residual_ok(P, c, a, b, s_c, rhs, rtol: float) -> Tensor:
    """Per sample, whether a CG solution (a, b) solves K [a; b] = [s_r; s_c], checked afresh
    rather than by CG's recurrence: ||c^-1/2 (s_c - c b - P^T a)|| <= ``CG_RESIDUAL_SLACK``
    rtol ||c^-1/2 rhs||. (The row block holds by the construction of a.)

    That residual is rhs - S b in exact arithmetic; CG converged in the norm of its Jacobi
    scaling D, with 1e-3 c <= D <= c (see ``linalg``), within a factor sqrt(1e3) of this one,
    and the rest of the slack allows for the recurrence's drift. Measured through a, it also
    sees a step along the gauge: b + t q solves S b = rhs for any t, but makes a = a - t, and
    the t eps left in P^T a + c b is what the same cancellation leaves in a (+) b. A solution
    that is not finite fails.
    """
    res = torch.addcmul(rowvec_mat(a, P), c, b).sub_(s_c)
    w = c.rsqrt().nan_to_num_(posinf=0.0)  # 0 on padding
    err, ref = torch.linalg.vector_norm(torch.stack([res, rhs]).mul_(w), dim=-1)
    return err <= (CG_RESIDUAL_SLACK * rtol) * ref


def solve_schur(P, c, rhs, rinv, scratch, solver: str) -> tuple[Tensor, Tensor, bool]:
    """b with S b = rhs by ``solver`` ("auto", "cg" or "cholesky"), per-sample success, and
    whether CG gave b. CG is used only where it can be trusted: not on tiny systems
    (``cg_trusted_size``); a CG that gave up (its rate predicted a miss of the budget) or
    stalled falls back on the direct solve, and the caller checks the rest afresh
    (``kkt_residual_ok``)."""
    n, m = P.shape[-1], P.shape[-2]
    budget = 4 * n + 50
    if solver == "auto":
        budget = cg_budget(n, m)
        solver = "cg" if budget >= 10 else "cholesky"
    if solver != "cg" or not cg_trusted_size(c):
        return (*solve_schur_cholesky(P, c, rhs, rinv, scratch), False)
    b, ok, _ = solve_schur_cg(P, c, rhs, rinv, scratch, cg_tol(P.dtype), budget, give_up=True)
    return b, ok, True


def _fall_back(P, c, rhs, rinv, scratch, b, ok, ridge=0.0) -> tuple[Tensor, Tensor]:
    """b solved directly (with ``ridge``) where not ``ok``; the new per-sample success."""
    b2, ok2 = solve_schur_cholesky(P, c, rhs, rinv, scratch, ridge=ridge)
    return torch.where(ok.unsqueeze(-1), b, b2), ok | ok2


def solve_column_side(P, r, c, s_r, s_c, scratch, solver: str = "auto"):
    """a, b with K [a; b] = [s_r; s_c], and the numbers of samples whose S was singular beyond
    the gauge (P numerically block-diagonal) and of those still failing with the ridge.

    A CG solution that fails its check is solved directly. Samples whose S is singular beyond
    the gauge are re-solved with a small ridge, which picks the near-minimum-norm solution:
    exact for a (+) b, a choice for a and b themselves. ``scratch``: an (m, n) buffer it
    overwrites (the caller may reuse it afterwards).
    """
    rinv, rhs = schur_rhs(P, r, s_r, s_c)
    b, ok, by_cg = solve_schur(P, c, rhs, rinv, scratch, solver)
    a = (s_r - mat_vec(P, b)) * rinv
    solved_again = False
    if by_cg:
        ok = ok & kkt_residual_ok(P, c, a, b, s_c, rhs, cg_tol(P.dtype))
        if not bool(ok.all()):
            b, ok = _fall_back(P, c, rhs, rinv, scratch, b, ok)
            solved_again = True
    n_bad = n_unresolved = 0
    if not bool(ok.all()):
        n_bad = int((~ok).sum())
        ridge = math.sqrt(torch.finfo(P.dtype).eps)
        b, ok = _fall_back(P, c, rhs, rinv, scratch, b, ok, ridge)
        n_unresolved, solved_again = int((~ok).sum()), True
    if solved_again:
        a = (s_r - mat_vec(P, b)) * rinv
    return a, b, n_bad, n_unresolved
