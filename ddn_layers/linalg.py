"""Shared linear algebra of the backward passes: every system is symmetric positive definite.

- :func:`guarded_cholesky`: batched Cholesky factors with per-sample failure detection; a
  failed sample's factor is the identity (so later solves stay finite) and the caller decides
  what its flag means (a ridge, a zero gradient, a warning). No other module calls
  ``cholesky_ex``.
- :func:`ridge_cholesky`: the factor of a slightly shifted matrix, for a least-squares
  solution where ``a`` is singular.
- :func:`cholesky_solve_vectors`: solves with such factors for one or many right-hand sides.
- :func:`smallest_eigenvalue_bound`: an upper bound on the smallest eigenvalue of L L^T from
  its factor, tight where that eigenvalue is near zero: what tells a matrix that is singular
  in exact arithmetic, and factored only thanks to rounding, from a merely ill-conditioned one.
- :func:`conjugate_gradient`: batched, preconditioned CG for operators that are only applied.
- :func:`diagonal_minus_gram_cg`: a fused, in-place CG for operators diag(d) - Q^T Q (Schur
  complements with a diagonal block), with an early give-up for callers that can solve
  directly instead.

Only Cholesky routines are used: batched LU solves are unreliable on some CPU builds (see
DESIGN.md), and every well-posed system of these layers is symmetric positive definite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def guarded_cholesky(a: Tensor, pivot_floor: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """Lower Cholesky factors of the batch ``a`` (B, n, n) and per-sample success (B,).

    A sample fails when the factorisation does (``cholesky_ex``'s info), and, unless
    ``pivot_floor`` is 0, when a pivot is not finite or its smallest squared pivot is at most
    ``pivot_floor``: a number or a (B,) tensor (an absolute floor), or None for 64 n eps times
    the largest squared pivot (a direction singular at working precision, whose solution
    would be amplified noise). Only
    the lower triangle of ``a`` is read. Failed factors are replaced by the identity. Under
    autograd (``a`` requires grad) the matrix itself is replaced before the factorisation that
    is differentiated: the backward of a failed factorisation is NaN or inf, and a zero
    incoming gradient does not cancel that.
    """
    with torch.no_grad():
        L, info = torch.linalg.cholesky_ex(a)
        ok = info == 0  # LAPACK also stops at a NaN pivot
        if pivot_floor is None or isinstance(pivot_floor, Tensor) or pivot_floor > 0:
            lo, hi = torch.aminmax(torch.diagonal(L, dim1=-2, dim2=-1), dim=-1)
            if pivot_floor is None:
                pivot_floor = (64 * a.shape[-1] * torch.finfo(a.dtype).eps) * hi.square()
            ok &= torch.isfinite(hi) & (lo.square() > pivot_floor)
    if bool(ok.all()):
        return (torch.linalg.cholesky_ex(a)[0] if a.requires_grad else L), ok
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    if a.requires_grad:
        return torch.linalg.cholesky_ex(torch.where(ok[:, None, None], a, eye))[0], ok
    return torch.where(ok[:, None, None], L, eye), ok


def ridge_cholesky(a: Tensor, relative: float | None = None) -> tuple[Tensor, Tensor]:
    """Lower Cholesky factors of a + delta I, delta = relative * mean(diag a) per sample
    (``relative`` defaults to sqrt(eps)), and per-sample success; a failed factor is the
    identity.

    For a singular positive semidefinite ``a`` (redundant constraints, say) solves with this
    factor give a least-squares solution of small norm, so that residuals computed from it
    still mean something; the caller has flagged those samples already. Only an outright
    failure counts here: no floor on the pivots, since the ridge is what keeps them off zero.
    """
    if relative is None:
        relative = math.sqrt(torch.finfo(a.dtype).eps)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    shift = relative * torch.diagonal(a, dim1=-2, dim2=-1).mean(-1)
    return guarded_cholesky(a + shift.clamp(min=0)[:, None, None] * eye, pivot_floor=0.0)


def cholesky_solve_vectors(L: Tensor, v: Tensor) -> Tensor:
    """(L L^T)^-1 v for factors L (B, m, m) and v (..., B, m).

    One right-hand side a sample is two triangular solves (cheaper than ``cholesky_solve``
    for a single column); extra leading axes become columns of one right-hand side matrix
    per sample, since ``cholesky_solve`` would broadcast them by copying L once per column.
    """
    if v.dim() == 2:
        z = torch.linalg.solve_triangular(L, v.unsqueeze(-1), upper=False)
        return torch.linalg.solve_triangular(L.mT, z, upper=True).squeeze(-1)
    lead, (B, m) = v.shape[:-2], v.shape[-2:]
    cols = v.reshape(-1, B, m).permute(1, 2, 0)
    return torch.cholesky_solve(cols, L).permute(2, 0, 1).reshape(*lead, B, m)


def smallest_eigenvalue_bound(L: Tensor) -> Tensor:
    """1 / ||A^-1 u|| with u = t / ||t||, t = A^-1 p, for A = L L^T (B, m, m): two steps of
    inverse iteration from a fixed probe p, per sample (B,). Normalising between the steps
    keeps the result from overflowing where the eigenvalue is tiny but representable.

    For a positive definite A it is at least A's smallest eigenvalue, and within rounding of
    it wherever that eigenvalue is far below the next (the first step already leaves t along
    its eigenvector unless p is orthogonal to it to within that ratio). A pivot floor cannot
    tell this: Cholesky without pivoting can spread a zero eigenvalue, rounded to a few eps
    ||A|| of either sign, into pivots many orders of magnitude larger. The probe's entries,
    cos(0.5 + 2.4 k), have one size and no simple pattern, so that no symmetric configuration
    makes it orthogonal to the eigenvector. Four triangular solves; call without autograd.
    """
    m = L.shape[-1]
    p = torch.cos(torch.arange(m, dtype=L.dtype, device=L.device) * 2.399963229728653 + 0.5)
    t1 = torch.cholesky_solve(p[:, None].expand(L.shape[0], m, 1), L)
    u = t1 / torch.linalg.vector_norm(t1, dim=(1, 2), keepdim=True)
    return 1.0 / torch.linalg.vector_norm(torch.cholesky_solve(u, L), dim=(1, 2))


@dataclass
class CGResult:
    """Solution and per-system record; every field but ``x`` has the shape of ``b[..., 0]``.

    ``indefinite``: a search direction met non-positive (or, relative to the largest curvature
    seen, numerically zero) curvature, so the operator is not positive definite there. That
    system stopped before the offending step: ``x`` is the last iterate, which is what a
    truncated Newton method wants and what a backward pass must flag.
    """

    x: Tensor
    iterations: Tensor
    converged: Tensor
    indefinite: Tensor
    residual: Tensor


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def _div(num: Tensor, den: Tensor, mask: Tensor) -> Tensor:
    """num / den where mask, else 0: finished systems divide 0 by 0, which must stay out."""
    return torch.where(mask, num / torch.where(mask, den, torch.ones_like(den)), 0.0)


def conjugate_gradient(
    apply_A: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    rtol: float | Tensor,
    max_iter: int,
    precond: Callable[[Tensor], Tensor] | None = None,
    check_every: int = 1,
) -> CGResult:
    """Solve A x = b for every system in a batch; b is (..., m), A maps (..., m) to (..., m).

    A system stops when ||r|| <= rtol ||b|| (rtol a number, or a tensor broadcastable to
    b[..., 0]); its scalars are then masked so it no longer moves while the others continue.
    ``check_every`` iterations pass between the host syncs that end the loop early.
    """
    eps = torch.finfo(b.dtype).eps
    x = torch.zeros_like(b)
    r = b
    z = precond(r) if precond is not None else r
    p = z
    rz = _dot(r, z)
    b_norm = torch.linalg.vector_norm(b, dim=-1)
    target = rtol * b_norm
    active = b_norm > 0
    converged = ~active
    indefinite = torch.zeros_like(active)
    iterations = torch.zeros(b.shape[:-1], dtype=torch.long, device=b.device)
    curvature_max = torch.zeros_like(b_norm)
    r_norm = b_norm
    for k in range(max_iter):
        Ap = apply_A(p)
        pAp = _dot(p, Ap)
        pp = _dot(p, p)
        rayleigh = _div(pAp, pp, active)
        curvature_max = torch.maximum(curvature_max, rayleigh.abs())
        # a Rayleigh quotient at rounding level of the largest one seen is a null direction in
        # all but name: stepping along it would divide by noise
        flat = active & (rayleigh <= 64 * eps * curvature_max)
        indefinite = indefinite | flat
        active = active & ~flat
        alpha = _div(rz, pAp, active)
        x = x + alpha.unsqueeze(-1) * p
        r = r - alpha.unsqueeze(-1) * Ap
        iterations = iterations + active.long()
        r_norm = torch.where(active, torch.linalg.vector_norm(r, dim=-1), r_norm)
        done = active & (r_norm <= target)
        converged = converged | done
        active = active & ~done
        if (k + 1) % check_every == 0 and not bool(active.any()):
            break
        z = precond(r) if precond is not None else r
        rz_new = _dot(r, z)
        beta = _div(rz_new, rz, active)
        p = z + beta.unsqueeze(-1) * p
        rz = rz_new
    residual = _div(r_norm, b_norm, b_norm > 0)
    return CGResult(x, iterations, converged, indefinite, residual)


@dataclass
class GramCGResult:
    """Solution of :func:`diagonal_minus_gram_cg` and its record.

    ``converged``: per system, the scaled residual met the tolerance; ``iterations``: the
    iterations the batch ran (systems that converged early were frozen, not dropped).
    """

    x: Tensor
    converged: Tensor
    iterations: int


def _jacobi_scaling(d: Tensor, Q: Tensor, gram_diagonal: Tensor | None) -> Tensor:
    """D^-1/2 for D = diag(diag(d) - Q^T Q), floored at 1e-3 d (where the two nearly cancel,
    the diagonal is rounding noise), and 1 on the absent entries (d = 0)."""
    if gram_diagonal is None:
        gram_diagonal = Q.square().sum(-2)
    diag = d - gram_diagonal
    return torch.where(d > 0, torch.maximum(diag, 1e-3 * d), 1.0).rsqrt_()


def diagonal_minus_gram_cg(
    d: Tensor,
    Q: Tensor,
    b: Tensor,
    *,
    rtol: float,
    max_iter: int,
    check_every: int = 5,
    give_up: bool = False,
    gram_diagonal: Tensor | None = None,
) -> GramCGResult:
    """Solve (diag(d) - Q^T Q) x = b for a batch by Jacobi-preconditioned CG, matrix-free.

    d (B, n), Q (B, m, n), b (B, n); the operator must be positive semidefinite, and where it
    is singular the system must be consistent (b in its range): then CG needs no gauge and
    the residual stays in the range. Entries with d = 0 are absent (their column of Q and
    entry of b are zero) and come out as 0. This is the form of a Schur complement
    C - B^T A^-1 B with a diagonal A (Q = A^-1/2 B). ``gram_diagonal``: diag(Q^T Q) where the
    caller has it more cheaply (by default it is computed from Q).

    The preconditioner is applied as a change of variables folded into Q, which is
    overwritten by Q D^-1/2: an iteration is then two matrix-vector products and a handful
    of fused, in-place vector operations on buffers allocated once, which matters where
    the dispatch cost of an operation rivals a product. A system whose residual meets
    ``rtol`` times its right-hand side (in the scaled variables) is frozen at the next check
    (every ``check_every`` iterations, one host sync each).

    ``give_up``: stop early, unconverged, once the residual's observed rate of decrease
    predicts that some system would need more than ``max_iter`` iterations (a caller with a
    direct solver to fall back on then has spent little).
    """
    scale = _jacobi_scaling(d, Q, gram_diagonal)
    Q.mul_(scale.unsqueeze(-2))
    neg_d = (d * scale * scale).neg_().unsqueeze(1)  # -d' (B, 1, n)
    cg = _GramCG(Q, neg_d, (scale * b).unsqueeze(1))
    prev = cg.norms()
    limit = [rtol * nrm for nrm in prev]
    last_check, next_check = 0, check_every
    it = 0
    for it in range(1, max_iter + 1):
        cg.step()
        if it != next_check:
            continue
        norms = cg.norms()
        going = [nrm > lim for nrm, lim in zip(norms, limit, strict=True)]
        if not any(going):
            break
        if not all(going):
            cg.freeze_all_but(going)
        more = _predicted_iterations(norms, prev, limit, it - last_check)
        # the rate over the first iterations understates CG's (it accelerates): a give-up
        # needs two checks' worth of evidence
        if give_up and it >= 2 * check_every and it + more > max_iter:
            break
        # check again when the slowest system should be done, and at least as often
        next_check = it + (max(1, math.ceil(more)) if more < check_every else check_every)
        last_check, prev = it, norms
    limit_t = torch.tensor(limit, dtype=Q.dtype, device=Q.device)
    converged = cg.res.squeeze(1).norm(dim=-1) <= limit_t
    return GramCGResult(cg.x.squeeze(1) * scale, converged, it)


class _GramCG:
    """The state of :func:`diagonal_minus_gram_cg`, every vector a row (B, 1, n) that the
    products take without reshaping.

    x and the residual share one buffer, as do p and -A p, so that one fused update advances
    both; dot products add a tiny floor in the same call, which keeps 0 / 0 out of a frozen
    system's step sizes.
    """

    def __init__(self, Q: Tensor, neg_d: Tensor, rhs: Tensor) -> None:
        B, m, n = Q.shape
        self.Q, self.neg_d, self.tiny = Q, neg_d, torch.finfo(Q.dtype).tiny
        self.floor = torch.full((B, 1, 1), self.tiny, dtype=Q.dtype, device=Q.device)
        self.xr = torch.zeros(2, B, 1, n, dtype=Q.dtype, device=Q.device)  # [x; residual]
        self.x, self.res = self.xr
        self.res.copy_(rhs)
        self.pq = torch.empty_like(self.xr)  # [p; -A p]
        self.p, self.neg_ap = self.pq
        self.p.copy_(self.res)
        # transposed views made once: views cost as much as the small operations themselves
        self.p_t, self.neg_ap_t, self.res_t = self.p.mT, self.neg_ap.mT, self.res.mT
        self.qp = Q.new_empty(B, m, 1)
        self.qp_t = self.qp.mT
        self.dp = torch.empty_like(self.p)
        self.rr, self.rr_new, self.pap, self.alpha, self.beta = (
            torch.empty_like(self.floor) for _ in range(5)
        )
        torch.baddbmm(self.floor, self.res, self.res_t, out=self.rr)  # (B, 1, 1)

    def step(self) -> None:
        """One CG iteration, in place: A p = d' o p - Q'^T (Q' p)."""
        torch.mul(self.neg_d, self.p, out=self.dp)
        torch.bmm(self.Q, self.p_t, out=self.qp)
        torch.baddbmm(self.dp, self.qp_t, self.Q, out=self.neg_ap)
        torch.baddbmm(self.floor, self.p, self.neg_ap_t, alpha=-1, out=self.pap)
        torch.div(self.rr, self.pap, out=self.alpha)
        self.xr.addcmul_(self.alpha, self.pq)  # x += alpha p, res -= alpha A p
        torch.baddbmm(self.floor, self.res, self.res_t, out=self.rr_new)
        torch.div(self.rr_new, self.rr, out=self.beta)
        torch.addcmul(self.res, self.beta, self.p, out=self.p)
        self.rr, self.rr_new = self.rr_new, self.rr

    def norms(self) -> list[float]:
        """Residual norms from the floored squared norms rr = tiny + res.res (host floats)."""
        return [math.sqrt(max(v - self.tiny, 0.0)) for v in self.rr.view(-1).tolist()]

    def freeze_all_but(self, going: list[bool]) -> None:
        """Zero the residual and direction of the systems not ``going``: every later step
        they take is exactly zero."""
        keep = torch.tensor(going, device=self.Q.device).view(-1, 1, 1)
        self.res.mul_(keep)
        self.p.mul_(keep)
        torch.where(keep, self.rr, self.floor, out=self.rr)


def _predicted_iterations(norms, prev_norms, limit, steps) -> float:
    """Iterations still needed by the slowest system at its residual's recent rate (lists)."""
    worst = 0.0
    for now, before, lim in zip(norms, prev_norms, limit, strict=True):
        if now <= lim:
            continue
        if not 0 < now < before:
            return math.inf
        rate = math.log(now / before) / steps
        worst = max(worst, math.log(lim / now) / rate)
    return worst
