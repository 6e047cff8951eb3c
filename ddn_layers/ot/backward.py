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
  consistent singular system gives the same gradient. S is solved by a Cholesky factorisation
  of its lower triangle (built from lower-triangle blocks only) or matrix-free by
  Jacobi-preconditioned conjugate gradients (``linalg.diagonal_minus_gram_cg``); ``auto``
  runs CG within the iteration budget that costs what the direct solve would
  (``cg_budget``), gives up early when its observed rate predicts a miss, and then solves
  directly. CG (``auto`` or ``cg``) is only trusted where it can be: a system with too few
  real unknowns is solved directly, and a CG solution is checked afresh (its recomputed
  residual and its gauge) before it is used, else solved directly. Only vectors are solved
  for: never the (m x n) right-hand sides of the paper's Fig. 4.
* ``full`` forms K (m + n square) densely, drops the first non-padded row constraint as the
  paper does (Eq. 16) and solves it by Cholesky: the unstructured baseline. Its gradient is
  differentiable again (create_graph=True).
* ``approx`` ignores the constraints: P = r c^T o exp(-gamma M) up to scaling, so
  dJ/dM = -gamma P o V, dJ/dr = s_r / r, dJ/dc = s_c / c (Fig. 4, line 6).

A failed factorisation is detected per sample (``linalg.guarded_cholesky``) and re-solved
with a small ridge (the near-minimum-norm solution) with an IllConditionedWarning; it is
never ignored.
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
from ddn_layers.ot.unrolled import solve_unrolled

Grads = tuple[Tensor, Tensor, Tensor]


def _rowvec_mat(x: Tensor, P: Tensor) -> Tensor:
    """x^T P for x (B, m), P (B, m, n) -> (B, n)."""
    if P.stride(-1) != 1 and P.stride(-2) == 1:  # P = Q^T of a contiguous Q: (Q x)^T
        return torch.bmm(P.mT, x.unsqueeze(-1)).squeeze(-1)
    return torch.bmm(x.unsqueeze(-2), P).squeeze(-2)


def _mat_vec(P: Tensor, y: Tensor) -> Tensor:
    """P y for P (B, m, n), y (B, n) -> (B, m).

    Both helpers pick the operand layout for which batched GEMV is fast: a row vector times a
    transposed matrix hits a much slower path for batch 1.
    """
    if P.stride(-1) != 1 and P.stride(-2) == 1:  # P = Q^T: (y^T Q)^T
        return torch.bmm(y.unsqueeze(-2), P.mT).squeeze(-2)
    return torch.bmm(P, y.unsqueeze(-1)).squeeze(-1)


def _inv_or_zero(x: Tensor) -> Tensor:
    return torch.where(x > 0, 1.0 / torch.where(x > 0, x, 1.0), 0.0)


def _schur_lower(Q: Tensor, block: int = 160) -> Tensor:
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
    rinv = _inv_or_zero(r)
    return rinv, s_c - _rowvec_mat(rinv * s_r, P)


def solve_schur_cholesky(P, c, rhs, rinv, scratch, ridge=0.0) -> tuple[Tensor, Tensor]:
    """Direct solve of S b = rhs and per-sample success; ``ridge`` (relative to mean(c))
    regularises a singular S. ``scratch`` is an (m, n) buffer it overwrites."""
    q = (c > 0).to(P.dtype)
    torch.mul(P, rinv.sqrt().unsqueeze(-1), out=scratch)  # Q = diag(r)^-1/2 P
    S = _schur_lower(scratch)
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
    gram_diagonal = _rowvec_mat(rinv, torch.mul(P, P, out=scratch))  # diag(P^T diag(rinv) P)
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
:func:`schur_solution_ok`)."""

CG_GAUGE_LIMIT = 16.0
"""The largest mean of a CG solution over its real entries, relative to its spread about that
mean, that :func:`schur_solution_ok` accepts."""


def cg_trusted_size(c: Tensor) -> bool:
    """Whether every sample's system is large enough for CG: with k real unknowns (one of them
    the gauge) CG converges in k - 1 iterations, so a system with k <= ``CG_CHECK_EVERY``
    would keep stepping after convergence, along directions made of rounding noise, before its
    first check (there a curvature at rounding level gives steps of any size)."""
    return bool(((c > 0).sum(-1) > CG_CHECK_EVERY).all())


def schur_solution_ok(P, c, rinv, b, rhs, rtol: float) -> Tensor:
    """Per sample, whether CG's b solves S b = rhs (S = diag(c) - P^T diag(rinv) P) and can be
    used: checked afresh, not by CG's recurrence.

    The residual: ||c^-1/2 (rhs - S b)|| <= ``CG_RESIDUAL_SLACK`` rtol ||c^-1/2 rhs||. CG
    converged in the norm of its Jacobi scaling D, with 1e-3 c <= D <= c (see ``linalg``),
    within a factor sqrt(1e3) of this one; the rest of the slack allows for the recurrence's
    drift. The gauge: b + t q solves the system for any t (q: the real entries), but a large t
    cancels in a (+) b only to t eps. CG's iterates keep sum D b = 0, so the mean of b over the
    real entries is at most its largest deviation from it; a mean far beyond that is a step
    along the null vector (``CG_GAUGE_LIMIT``). A b that is not finite fails.
    """
    Sb = c * b - _rowvec_mat(rinv * _mat_vec(P, b), P)
    w = _inv_or_zero(c).sqrt_()
    err = torch.linalg.vector_norm(w * (rhs - Sb), dim=-1)
    ok = err <= (CG_RESIDUAL_SLACK * rtol) * torch.linalg.vector_norm(w * rhs, dim=-1)
    q = (c > 0).to(b.dtype)
    mean = (b * q).sum(-1, keepdim=True) / q.sum(-1, keepdim=True).clamp_min(1)
    spread = ((b - mean) * q).abs().amax(-1)
    return ok & (mean.squeeze(-1).abs() <= CG_GAUGE_LIMIT * spread)


def _solve_schur(P, c, rhs, rinv, scratch, solver: str) -> tuple[Tensor, Tensor]:
    """b with S b = rhs by ``solver`` ("auto", "cg" or "cholesky"), and per-sample success.

    CG is used only where it can be trusted: not on tiny systems (``cg_trusted_size``), and
    its solution is checked afresh (``schur_solution_ok``). A CG that
    gave up (its rate predicted a miss of the budget), stalled or failed the check falls back
    on the direct solve."""
    n, m = P.shape[-1], P.shape[-2]
    budget = 4 * n + 50
    if solver == "auto":
        budget = cg_budget(n, m)
        solver = "cg" if budget >= 10 else "cholesky"
    if solver != "cg" or not cg_trusted_size(c):
        return solve_schur_cholesky(P, c, rhs, rinv, scratch)
    rtol = cg_tol(P.dtype)
    b, ok, _ = solve_schur_cg(P, c, rhs, rinv, scratch, rtol, budget, give_up=True)
    ok = ok & schur_solution_ok(P, c, rinv, b, rhs, rtol)
    if not bool(ok.all()):
        b2, ok2 = solve_schur_cholesky(P, c, rhs, rinv, scratch)
        b = torch.where(ok.unsqueeze(-1), b, b2)
        ok = ok | ok2
    return b, ok


def implicit_grads(P: Tensor, r: Tensor, c: Tensor, V: Tensor, gamma: float, solver="auto"):
    """(dJ/dM, dJ/dr, dJ/dc) by the Schur complement on the smaller side of P."""
    m, n = P.shape[-2:]
    transpose = m < n  # solve on the smaller side: the rows
    if transpose:
        P, r, c, V = P.mT, c, r, V.mT
    X = torch.mul(P, V)  # P o V, reused below as scratch and as the output buffer
    s_r, s_c = X.sum(-1), X.sum(-2)
    rinv, rhs = schur_rhs(P, r, s_r, s_c)
    b, ok = _solve_schur(P, c, rhs, rinv, X, solver)
    if not bool(ok.all()):
        # S is singular beyond the gauge (P numerically block-diagonal): a small ridge picks
        # the near-minimum-norm solution, exact for dJ/dM, a choice for dJ/dr and dJ/dc.
        ridge = math.sqrt(torch.finfo(P.dtype).eps)
        b2, ok2 = solve_schur_cholesky(P, c, rhs, rinv, X, ridge=ridge)
        b = torch.where(ok.unsqueeze(-1), b, b2)
        _warn_ill_conditioned(int((~ok).sum()), int((~ok2).sum()))
    a = (s_r - _mat_vec(P, b)) * rinv
    # dJ/dM = gamma P o (a (+) b - V), written into X in three passes (gamma on the vectors)
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


def full_grads(P: Tensor, r: Tensor, c: Tensor, V: Tensor, gamma: float):
    """(dJ/dM, dJ/dr, dJ/dc) by a dense Cholesky solve of the (m + n)-square system K."""
    m = P.shape[-2]
    G = P * V
    K, s = _dense_kkt(P, r, c, torch.cat([G.sum(-1), G.sum(-2)], dim=-1))
    L, ok = guarded_cholesky(K, pivot_floor=0.0)
    ab = torch.cholesky_solve(s.unsqueeze(-1), L)
    a, b = ab[:, :m, 0], ab[:, m:, 0]
    if not bool(ok.all()):
        # Dropping a constraint leaves a numerically singular system when P is (nearly)
        # block-diagonal; the implicit path handles those samples (and warns).
        _, a2, b2 = implicit_grads(P, r, c, V, gamma, "cholesky")
        a = torch.where(ok.view(-1, 1), a, a2)
        b = torch.where(ok.view(-1, 1), b, b2)
        _warn_ill_conditioned(int((~ok).sum()), 0, "full")
    dM = gamma * P * (a.unsqueeze(-1) + b.unsqueeze(-2) - V)
    return dM, a, b


def approx_grads(P: Tensor, r: Tensor, c: Tensor, V: Tensor, gamma: float):
    """Constraints ignored (see the module docstring)."""
    G = P * V
    return -gamma * G, G.sum(-1) * _inv_or_zero(r), G.sum(-2) * _inv_or_zero(c)


def implicit(ctx: BackwardContext, V: Tensor) -> Grads:
    """``implicit``: the Schur complement, solved by ``ctx.opts.implicit_solver``."""
    (P,) = ctx.saved
    return implicit_grads(P, P.sum(-1), P.sum(-2), V, ctx.opts.gamma, ctx.opts.implicit_solver)


def full(ctx: BackwardContext, V: Tensor) -> Grads:
    """``full``: the dense KKT system; differentiable again."""
    (P,) = ctx.saved
    return full_grads(P, P.sum(-1), P.sum(-2), V, ctx.opts.gamma)


def approx(ctx: BackwardContext, V: Tensor) -> Grads:
    """``approx``: the constraints ignored."""
    (P,) = ctx.saved
    return approx_grads(P, P.sum(-1), P.sum(-2), V, ctx.opts.gamma)


BACKWARDS = {
    BackwardMode.IMPLICIT: implicit,
    BackwardMode.FULL: full,
    BackwardMode.APPROX: approx,
    BackwardMode.UNROLL: Unrolled(solve_unrolled),
}
"""The backward of each mode: ``fn(ctx, V) -> (dJ/dM, dJ/dr, dJ/dc)`` on the saved plan and
its own marginals (see the module docstring)."""
