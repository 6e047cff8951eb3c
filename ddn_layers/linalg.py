"""Shared linear algebra of the backward passes: every system is symmetric positive definite.

- :func:`guarded_cholesky`: batched Cholesky factors with per-sample failure detection; a
  failed sample's factor is the identity (so later solves stay finite) and the caller decides
  what its flag means (a ridge, a zero gradient, a warning). No other module calls
  ``cholesky_ex``.
- :func:`ridge_cholesky`: the factor of a slightly shifted matrix, for a least-squares
  solution where ``a`` is singular.
- :func:`cholesky_solve_vectors`: solves with such factors for one or many right-hand sides.
- :func:`conjugate_gradient`: batched, preconditioned CG for operators that are only applied.

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

    A sample fails when the factorisation does (``cholesky_ex``'s info), when a pivot is not
    finite, or when its smallest squared pivot is at most ``pivot_floor``: a number or a (B,)
    tensor (an absolute floor), or None for 64 n eps times the largest squared pivot (a
    direction singular at working precision, whose solution would be amplified noise). Only
    the lower triangle of ``a`` is read. Failed factors are replaced by the identity. Under
    autograd (``a`` requires grad) the matrix itself is replaced before the factorisation that
    is differentiated: the backward of a failed factorisation is NaN or inf, and a zero
    incoming gradient does not cancel that.
    """
    with torch.no_grad():
        L, info = torch.linalg.cholesky_ex(a)
        sq = torch.diagonal(L, dim1=-2, dim2=-1).square()
        if pivot_floor is None:
            pivot_floor = 64 * a.shape[-1] * torch.finfo(a.dtype).eps * sq.amax(-1)
        ok = (info == 0) & torch.isfinite(sq).all(-1) & (sq.amin(-1) > pivot_floor)
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
