"""Backward passes of entropic optimal transport: the algebra of each backward mode.

Notation (per sample): P (m, n) the plan, r = P 1 and c = P^T 1 its marginals (the marginals
P has, not the targets: they agree within tol, and with them K below is PSD even for a
truncated solve, whose gradient is then the exact gradient of the problem P solves), zeros =
padding, V = dJ/dP.
The KKT conditions give P = exp(gamma (alpha (+) beta - M)); differentiating them and the
constraints (Eq. 3 with H^-1 = diag(gamma P), B = I, Eqs. 16-27) reduces every exact mode to
the symmetric system

    K [a; b] = [s_r; s_c],   K = [[diag(r), P], [P^T, diag(c)]],
    s_r = (P o V) 1,  s_c = (P o V)^T 1,

after which  dJ/dM = gamma P o (a (+) b - V),  dJ/dr = a,  dJ/dc = b.  K is A H^-1 A^T / gamma
(Eq. 18) with the redundant constraint kept: it is PSD with the null vector (1, -1), the
"gauge" (a + t, b - t) that the normalisation of r and c (done by the caller) projects out.

* ``implicit`` eliminates the larger side and solves the Schur complement of the smaller one
  (footnote 3): on the column side  S = diag(c) - P^T diag(1/r) P  (n x n), PSD with null vector
  1, made SPD by adding  delta q q^T  (q = the non-padded columns); any solution of the
  consistent singular system gives the same gradient (schur.py, shared with the forward's
  Newton step). S is solved by a Cholesky factorisation of its lower triangle (built from
  lower-triangle blocks only) or matrix-free by Jacobi-preconditioned conjugate gradients
  (``linalg.diagonal_minus_gram_cg``); ``auto``
  runs CG within the iteration budget that costs what the direct solve would
  (``cg_budget``), gives up early when its observed rate predicts a miss, and then solves
  directly. CG (``auto`` or ``cg``) is only trusted where it can be: a system with too few
  real unknowns is solved directly, and a CG solution is checked afresh (the recomputed
  residual of K [a; b] = [s_r; s_c]) before it is used, else solved directly. Only vectors
  are solved for: never the (m x n) right-hand sides of the paper's Fig. 4.
* ``full`` forms K (m + n square) densely, drops the first non-padded row constraint as the
  paper does (Eq. 16) and solves it by Cholesky: the unstructured baseline. Its gradient is
  differentiable again (create_graph=True).
* ``approx`` ignores the constraints: P = r c^T o exp(-gamma M) up to scaling, so
  dJ/dM = -gamma P o V, dJ/dr = s_r / r, dJ/dc = s_c / c (Fig. 4, line 6).

With ``log_plan`` the saved output is log P and the incoming gradient W = dJ/d(log P): every
formula above uses V only through P o V = W, so each mode runs with W in its place
(dJ/dM = gamma (P o (a (+) b) - W) for the exact modes, -gamma W for ``approx``, which is
then the derivative of log P with the scalings held fixed); W is masked on padding first
(logplan.py).

A failed factorisation is detected per sample (``linalg.guarded_cholesky``) and re-solved
with a small ridge (the near-minimum-norm solution) with an IllConditionedWarning; it is
never ignored.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ddn_layers.base import BackwardContext, Unrolled
from ddn_layers.checks import IllConditionedWarning
from ddn_layers.linalg import guarded_cholesky
from ddn_layers.modes import BackwardMode
from ddn_layers.ot.logplan import plan_and_weight
from ddn_layers.ot.schur import inv_or_zero, solve_column_side
from ddn_layers.ot.unrolled import solve_unrolled

Grads = tuple[Tensor, Tensor, Tensor]


def implicit_grads(
    P: Tensor, r: Tensor, c: Tensor, V: Tensor, gamma: float, solver="auto", log=False
):
    """(dJ/dM, dJ/dr, dJ/dc) by the Schur complement on the smaller side of P; with ``log``,
    V is dJ/d(log P), masked (logplan.py), and P o dJ/dP is V itself."""
    m, n = P.shape[-2:]
    transpose = m < n  # solve on the smaller side: the rows
    if transpose:
        P, r, c, V = P.mT, c, r, V.mT
    # P o dJ/dP, reused below as scratch and as the output buffer
    X = V.clone() if log else torch.mul(P, V)
    a, b, n_bad, n_unresolved = solve_column_side(P, r, c, X.sum(-1), X.sum(-2), X, solver)
    if n_bad:
        _warn_ill_conditioned(n_bad, n_unresolved)
    if log:  # dJ/dM = gamma (P o (a (+) b) - W)
        torch.add(a.unsqueeze(-1), b.unsqueeze(-2), out=X).mul_(P).sub_(V).mul_(gamma)
    else:  # dJ/dM = gamma P o (a (+) b - V), written into X in three passes (gamma on vectors)
        torch.sub((gamma * a).unsqueeze(-1), V, alpha=gamma, out=X)
        X.add_((gamma * b).unsqueeze(-2)).mul_(P)
    if transpose:
        return X.mT, b, a
    return X, a, b


def _warn_ill_conditioned(n_bad: int, n_unresolved: int, what: str = "implicit") -> None:
    if what == "implicit":
        msg = (
            f"sinkhorn backward: the Schur complement was singular for {n_bad} sample(s) (P is "
            "numerically block-diagonal, e.g. gamma * M so large that P is a near-permutation); "
            "solved with a small ridge: the gradient with respect to M is unaffected, those "
            "with respect to r and c are the near-minimum-norm choice."
        )
    else:
        msg = (
            f"sinkhorn backward (full): the dense KKT system was singular for {n_bad} "
            "sample(s) (P is numerically block-diagonal); those were solved by the implicit "
            "path instead."
        )
    if n_unresolved:
        msg += f" The regularised system still failed for {n_unresolved} of them."
    warnings.warn(msg, IllConditionedWarning, stacklevel=4)


def _dense_kkt(P: Tensor, r: Tensor, c: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """K with the first non-padded row constraint dropped (Eq. 16: the others imply it) and
    padded rows/columns replaced by identity rows, and the right-hand side masked alike."""
    B, m, n = P.shape
    K = P.new_zeros(B, m + n, m + n)
    K[:, :m, m:] = P
    K[:, m:, :m] = P.mT
    mask = torch.cat([r > 0, c > 0], dim=-1)
    first_row = (r > 0).to(torch.int8).argmax(-1)
    mask[torch.arange(B, device=P.device), first_row] = False
    fm = mask.to(P.dtype)
    K.mul_(fm.unsqueeze(-1)).mul_(fm.unsqueeze(-2))
    K.diagonal(dim1=-2, dim2=-1).copy_(torch.where(mask, torch.cat([r, c], -1), 1.0))
    return K, s * fm


def full_grads(P: Tensor, r: Tensor, c: Tensor, V: Tensor, gamma: float, log=False):
    """(dJ/dM, dJ/dr, dJ/dc) by a dense Cholesky solve of the (m + n)-square system K (``log``
    as in :func:`implicit_grads`)."""
    m = P.shape[-2]
    G = V if log else P * V
    K, s = _dense_kkt(P, r, c, torch.cat([G.sum(-1), G.sum(-2)], dim=-1))
    L, ok = guarded_cholesky(K, pivot_floor=0.0)
    ab = torch.cholesky_solve(s.unsqueeze(-1), L)
    a, b = ab[:, :m, 0], ab[:, m:, 0]
    if not bool(ok.all()):
        # Dropping a constraint leaves a numerically singular system when P is (nearly)
        # block-diagonal; the implicit path handles those samples (and warns).
        _, a2, b2 = implicit_grads(P, r, c, V, gamma, "cholesky", log)
        a = torch.where(ok.view(-1, 1), a, a2)
        b = torch.where(ok.view(-1, 1), b, b2)
        _warn_ill_conditioned(int((~ok).sum()), 0, "full")
    ab = a.unsqueeze(-1) + b.unsqueeze(-2)
    dM = gamma * (P * ab - G) if log else gamma * P * (ab - V)
    return dM, a, b


def approx_grads(P: Tensor, r: Tensor, c: Tensor, V: Tensor, gamma: float, log=False):
    """Constraints ignored (see the module docstring; ``log`` as in :func:`implicit_grads`)."""
    G = V if log else P * V
    return -gamma * G, G.sum(-1) * inv_or_zero(r), G.sum(-2) * inv_or_zero(c)


def _plan(ctx: BackwardContext, V: Tensor) -> tuple[Tensor, Tensor, bool]:
    """The saved plan (P, or log P with ``log_plan``) as P, the incoming gradient to use and
    whether it is a log plan's (logplan.py)."""
    (saved,) = ctx.saved
    log = ctx.opts.log_plan
    return (*plan_and_weight(saved, V, log), log)


def implicit(ctx: BackwardContext, V: Tensor) -> Grads:
    """``implicit``: the Schur complement, solved by ``ctx.opts.implicit_solver``."""
    P, V, log = _plan(ctx, V)
    solver = ctx.opts.implicit_solver
    return implicit_grads(P, P.sum(-1), P.sum(-2), V, ctx.opts.gamma, solver, log)


def full(ctx: BackwardContext, V: Tensor) -> Grads:
    """``full``: the dense KKT system; differentiable again."""
    P, V, log = _plan(ctx, V)
    return full_grads(P, P.sum(-1), P.sum(-2), V, ctx.opts.gamma, log)


def approx(ctx: BackwardContext, V: Tensor) -> Grads:
    """``approx``: the constraints ignored."""
    P, V, log = _plan(ctx, V)
    return approx_grads(P, P.sum(-1), P.sum(-2), V, ctx.opts.gamma, log)


BACKWARDS = {
    BackwardMode.IMPLICIT: implicit,
    BackwardMode.FULL: full,
    BackwardMode.APPROX: approx,
    BackwardMode.UNROLL: Unrolled(solve_unrolled),
}
"""The backward of each mode: ``fn(ctx, V) -> (dJ/dM, dJ/dr, dJ/dc)`` on the saved plan and
its own marginals (see the module docstring)."""
