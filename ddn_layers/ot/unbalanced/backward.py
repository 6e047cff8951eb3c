"""Backward passes of unbalanced entropic optimal transport: the algebra of each mode.

Notation (per sample): P (m, n) the plan, p = P 1 and q = P^T 1 its marginals, r and c the
given masses (zeros = padding), V = dJ/dP, lam = 1 / (gamma rho) on each side (0 on a hard
side) and kappa = 1 + lam. Stationarity in P,

    M + (log P - log r (+) log c) / gamma + rho_r log(p / r) (+) rho_c log(q / c) = 0,

has the Hessian H = diag(1 / (gamma P)) + A^T diag(rho_r / p, rho_c / q) A (A: row and column
sums). Its inverse by the Woodbury identity reduces every exact mode to the system

    K [a; b] = [s_r; s_c],   K = [[kappa_r diag(p), P], [P^T, kappa_c diag(q)]],
    s_r = (P o V) 1,  s_c = (P o V)^T 1,

after which  dJ/dM = gamma P o (a (+) b - V),  dJ/dr = kappa_r a p / r,  dJ/dc = kappa_c b q / c
(on a hard side, kappa = 1 and the derivative of the constraint P 1 = r is a itself). This is
the balanced system (backward.py of the balanced layer) with its diagonal blocks raised by
kappa: it has no gauge, and where a side is soft its Schur complement
S = kappa_c diag(q) - P^T diag(1 / (kappa_r p)) P  is at least
(kappa_c - 1 / kappa_r) diag(q) (since P^T diag(1/p) P <= diag(q)): strictly positive definite.

* ``implicit`` eliminates the larger side and solves S on the smaller one by Cholesky (its
  lower triangle only) or matrix-free by Jacobi-preconditioned CG
  (``linalg.diagonal_minus_gram_cg``); ``auto`` runs CG within the budget that costs what the
  direct solve would and solves directly where CG gives up. Only vectors are solved for.
* ``full`` forms K ((m + n) square) densely and solves it by Cholesky; differentiable again.
* ``approx`` ignores the constraints: P = diag(U) (r c^T o exp(-gamma M)) diag(V) with the
  scalings held fixed, so dJ/dM = -gamma P o V, dJ/dr = s_r / r, dJ/dc = s_c / c.

With ``log_plan`` the saved output is log P and each mode runs with W = dJ/d(log P), masked
on padding, in place of P o V (as in the balanced layer's backward.py).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ddn_layers.base import BackwardContext, Unrolled
from ddn_layers.checks import IllConditionedWarning
from ddn_layers.linalg import cholesky_solve_vectors, diagonal_minus_gram_cg, guarded_cholesky
from ddn_layers.modes import BackwardMode
from ddn_layers.ot.logplan import plan_and_weight
from ddn_layers.ot.schur import cg_budget, cg_tol, inv_or_zero, mat_vec, rowvec_mat, schur_lower
from ddn_layers.ot.unbalanced.solver import Sides
from ddn_layers.ot.unbalanced.unrolled import solve_unrolled

CG_CHECK_EVERY = 5
"""Iterations between the Schur CG's convergence checks; a system with at most this many
real unknowns is solved directly (CG would converge before its first check)."""


def solve_schur_cholesky(P, rinv, d, rhs, scratch, ridge: float = 0.0):
    """b with S b = rhs by Cholesky, S = diag(d) - Q^T Q, Q = diag(rinv)^1/2 P (formed in
    ``scratch``, an (m, n) buffer it overwrites), and per-sample success. Entries with d = 0
    (padding) get identity rows; ``ridge`` (relative to the mean of d) regularises a
    numerically singular S."""
    Q = torch.mul(P, rinv.sqrt().unsqueeze(-1), out=scratch)
    S = schur_lower(Q)
    diag = torch.where(d > 0, d, 1.0)
    if ridge:
        diag = diag + ridge * d.mean(-1, keepdim=True)
    S.diagonal(dim1=-2, dim2=-1).add_(diag)
    L, ok = guarded_cholesky(S, pivot_floor=0.0)
    return cholesky_solve_vectors(L, rhs), ok


def solve_schur(P, rinv, d, rhs, scratch, solver: str) -> tuple[Tensor, Tensor]:
    """b with S b = rhs (S as in :func:`solve_schur_cholesky`, strictly positive definite) by
    ``solver`` ("auto", "cg" or "cholesky"), and per-sample success. CG that does not
    converge within its budget (``auto``: the cost of the direct solve) falls back on
    Cholesky; so do systems too small for CG's checks."""
    m, n = P.shape[-2:]
    budget = 4 * n + 50
    if solver == "auto":
        budget = cg_budget(n, m)
        solver = "cg" if budget >= 10 else "cholesky"
    if solver != "cg" or not bool(((d > 0).sum(-1) > CG_CHECK_EVERY).all()):
        return solve_schur_cholesky(P, rinv, d, rhs, scratch)
    gram_diagonal = rowvec_mat(rinv, torch.mul(P, P, out=scratch))  # diag(Q^T Q)
    Q = torch.mul(P, rinv.sqrt().unsqueeze(-1), out=scratch)
    res = diagonal_minus_gram_cg(
        d, Q, rhs, rtol=cg_tol(P.dtype), max_iter=budget, check_every=CG_CHECK_EVERY,
        give_up=True, gram_diagonal=gram_diagonal,
    )  # fmt: skip
    b, ok = res.x, res.converged & torch.isfinite(res.x).all(-1)
    if not bool(ok.all()):
        b2, ok2 = solve_schur_cholesky(P, rinv, d, rhs, scratch)
        b, ok = torch.where(ok.unsqueeze(-1), b, b2), ok | ok2
    return b, ok


def _marginal_grad(a: Tensor, p: Tensor, x: Tensor, lam: float) -> Tensor:
    """dJ/dr from the multiplier a: kappa a p / r on a soft side, a on a hard one; 0 on
    padding."""
    if lam == 0:
        return torch.where(x > 0, a, 0.0)
    return (1.0 + lam) * a * p * inv_or_zero(x)


def implicit_grads(P, r, c, V, gamma: float, sides: Sides, solver: str = "auto", log=False):
    """(dJ/dM, dJ/dr, dJ/dc) by the Schur complement on the smaller side of P; with ``log``,
    V is dJ/d(log P), masked (ot/logplan.py), and P o dJ/dP is V itself."""
    lam_r, lam_c = sides.lam_r, sides.lam_c
    transpose = P.shape[-2] < P.shape[-1]  # solve on the smaller side: the rows
    if transpose:
        P, r, c, V, lam_r, lam_c = P.mT, c, r, V.mT, lam_c, lam_r
    p, q = P.sum(-1), P.sum(-2)
    # P o dJ/dP, reused as scratch and as the output buffer
    X = V.clone() if log else torch.mul(P, V)
    s_r, s_c = X.sum(-1), X.sum(-2)
    rinv = inv_or_zero((1.0 + lam_r) * p)
    rhs = s_c - rowvec_mat(rinv * s_r, P)
    d = (1.0 + lam_c) * q
    b, ok = solve_schur(P, rinv, d, rhs, X, solver)
    if not bool(ok.all()):
        ridge = math.sqrt(torch.finfo(P.dtype).eps)
        b2, ok2 = solve_schur_cholesky(P, rinv, d, rhs, X, ridge=ridge)
        b = torch.where(ok.unsqueeze(-1), b, b2)
        _warn_ill_conditioned(int((~ok).sum()), int((~ok2).sum()))
    a = (s_r - mat_vec(P, b)) * rinv
    if log:  # dJ/dM = gamma (P o (a (+) b) - W)
        torch.add(a.unsqueeze(-1), b.unsqueeze(-2), out=X).mul_(P).sub_(V).mul_(gamma)
    else:  # dJ/dM = gamma P o (a (+) b - V), written into X in three passes
        torch.sub((gamma * a).unsqueeze(-1), V, alpha=gamma, out=X)
        X.add_((gamma * b).unsqueeze(-2)).mul_(P)
    ga, gb = _marginal_grad(a, p, r, lam_r), _marginal_grad(b, q, c, lam_c)
    return (X.mT, gb, ga) if transpose else (X, ga, gb)


def _warn_ill_conditioned(n_bad: int, n_unresolved: int, what: str = "implicit") -> None:
    msg = (
        f"sinkhorn backward ({what}, unbalanced): the KKT system was numerically singular for "
        f"{n_bad} sample(s) (P numerically block-diagonal with a penalty so large that the "
        "problem is nearly balanced); solved with a small ridge."
    )
    if n_unresolved:
        msg += f" The regularised system still failed for {n_unresolved} of them."
    warnings.warn(msg, IllConditionedWarning, stacklevel=4)


def _dense_kkt(P, p, q, s, lam_r: float, lam_c: float):
    """K with padded rows/columns replaced by identity rows, and the right-hand side masked
    alike."""
    B, m, n = P.shape
    mask = torch.cat([p > 0, q > 0], dim=-1)
    fm = mask.to(P.dtype)
    K = torch.cat(
        [torch.cat([P.new_zeros(B, m, m), P], -1), torch.cat([P.mT, P.new_zeros(B, n, n)], -1)], -2
    )
    K = K * fm.unsqueeze(-1) * fm.unsqueeze(-2)
    diag = torch.cat([(1.0 + lam_r) * p, (1.0 + lam_c) * q], -1)
    K = K + torch.diag_embed(torch.where(mask, diag, 1.0))
    return K, s * fm


def full_grads(P, r, c, V, gamma: float, sides: Sides, log=False):
    """(dJ/dM, dJ/dr, dJ/dc) by a dense Cholesky solve of the (m + n)-square system K
    (``log`` as in :func:`implicit_grads`)."""
    m = P.shape[-2]
    p, q = P.sum(-1), P.sum(-2)
    G = V if log else P * V
    K, s = _dense_kkt(P, p, q, torch.cat([G.sum(-1), G.sum(-2)], -1), sides.lam_r, sides.lam_c)
    L, ok = guarded_cholesky(K, pivot_floor=0.0)
    ab = torch.cholesky_solve(s.unsqueeze(-1), L)
    a, b = ab[:, :m, 0], ab[:, m:, 0]
    if not bool(ok.all()):
        _, a2, b2 = implicit_grads(P.detach(), r, c, V.detach(), gamma, sides, "cholesky", log)
        a = torch.where(ok.view(-1, 1), a, a2)
        b = torch.where(ok.view(-1, 1), b, b2)
        _warn_ill_conditioned(int((~ok).sum()), 0, "full")
    ab = a.unsqueeze(-1) + b.unsqueeze(-2)
    dM = gamma * (P * ab - G) if log else gamma * P * (ab - V)
    return dM, _marginal_grad(a, p, r, sides.lam_r), _marginal_grad(b, q, c, sides.lam_c)


def approx_grads(P, r, c, V, gamma: float, log=False):
    """The scalings held fixed (see the module docstring; ``log`` as in
    :func:`implicit_grads`)."""
    G = V if log else P * V
    return -gamma * G, G.sum(-1) * inv_or_zero(r), G.sum(-2) * inv_or_zero(c)


def _saved(ctx: BackwardContext, V: Tensor):
    """P (from log P with ``log_plan``), the masses, the incoming gradient to use (masked for
    a log plan, ot/logplan.py), gamma and the sides."""
    saved, r, c = ctx.saved
    log = ctx.opts.log_plan
    P, V = plan_and_weight(saved, V, log)
    return P, r, c, V, log, Sides.of(ctx.opts.gamma, ctx.opts.marginal_penalty)


def implicit(ctx: BackwardContext, V: Tensor):
    """``implicit``: the Schur complement, solved by ``ctx.opts.implicit_solver``."""
    P, r, c, V, log, sides = _saved(ctx, V)
    return implicit_grads(P, r, c, V, ctx.opts.gamma, sides, ctx.opts.implicit_solver, log)


def full(ctx: BackwardContext, V: Tensor):
    """``full``: the dense KKT system; differentiable again."""
    P, r, c, V, log, sides = _saved(ctx, V)
    return full_grads(P, r, c, V, ctx.opts.gamma, sides, log)


def approx(ctx: BackwardContext, V: Tensor):
    """``approx``: the constraints ignored."""
    P, r, c, V, log, _ = _saved(ctx, V)
    return approx_grads(P, r, c, V, ctx.opts.gamma, log)


BACKWARDS = {
    BackwardMode.IMPLICIT: implicit,
    BackwardMode.FULL: full,
    BackwardMode.APPROX: approx,
    BackwardMode.UNROLL: Unrolled(solve_unrolled),
}
"""The backward of each mode: ``fn(ctx, V) -> (dJ/dM, dJ/dr, dJ/dc)`` on the saved plan and
the masses (see the module docstring)."""
