"""Batched, preconditioned conjugate gradients for symmetric positive definite operators.

Every solve of the generic node goes through here: the Hessian solves of the ``implicit``
backward, the Schur complement when it is too large to form, and the Newton steps of the
default forward solver. The operator is only ever applied, never formed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


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
