"""Vector-Jacobian products of the pooling solution y(x, alpha) for the implicit-style modes.

With d_i = y - x_i, H = sum_i k1_i I + k2_i d_i d_i^T and v = dJ/dy, the implicit function
theorem gives (Eqs. 6-10)

    dJ/dx_j  = k1_j w + k2_j (w . d_j) d_j,          w = H^-1 v,
    dJ/dalpha = -w . sum_i (d k1_i / d alpha) d_i.

``implicit`` evaluates this left to right (one solve for w, then O(nC) work, no per-point
matrix); ``full`` forms every B_j = k1_j I + k2_j d_j d_j^T and the whole Jacobian H^-1 B_j, as
Eq. 9 reads (O(n C^2) memory: the baseline); ``approx`` replaces H by (sum k1) I and, to stay
consistent, drops the k2 term of B_j too: that is the gradient of the weighted mean with the
weights held fixed, it keeps sum_j dy/dx_j = I (translation equivariance) exactly, and it is
exact wherever k2 = 0.

The kappas may carry a common positive factor per sample (penalties.py): w scales by its
inverse, and every product above by one, so the gradients do not depend on it.

Where H is singular or indefinite (a flat objective, a minimiser that is not unique, or a saddle
of a non-convex penalty) the minimiser does not depend smoothly on x, and these samples get a
zero gradient; ``singular`` flags them, and the backward warns. ``implicit`` (either route) and
``full`` detect it the same way (hessian.factor: a failed factorisation, a negligible pivot, or
a smallest eigenvalue at the rounding level of H); ``approx`` solves with (sum k1) I and flags
only a sum of weights of zero. ``unroll`` has no Hessian to check: it differentiates the
iterations the solver ran, which at such a point is the derivative of the solver's path to it
(for two huber points farther apart than 2 alpha, the mean's: dy/dx_j = I / 2), not that of a
unique minimiser.

Each mode's entry in :data:`BACKWARDS` takes the ``BackwardContext`` of ``run_layer`` (saved:
x, y, alpha; opts: the ``PoolCall``) and returns (dJ/dx, dJ/dalpha).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ddn_layers.base import BackwardContext, Unrolled
from ddn_layers.checks import IllConditionedWarning
from ddn_layers.modes import BackwardMode
from ddn_layers.pooling.hessian import choose_solver, factor, hessian_solve
from ddn_layers.pooling.options import PoolCall
from ddn_layers.pooling.penalties import Penalty


@dataclass
class Gradients:
    """dJ/dx (B, C, n), the per-sample terms of dJ/dalpha (B,), and the singular samples."""

    x: Tensor | None
    alpha: Tensor | None
    singular: Tensor


def _terms(x: Tensor, y: Tensor, penalty: Penalty, alpha: Tensor):
    d = y[:, :, None] - x
    z = torch.linalg.vector_norm(d, dim=1)
    k1, k2, k1a = penalty.scaled_kappas(z, alpha)
    return d, k1, k2, k1a


def _alpha_term(d: Tensor, k1a: Tensor, w: Tensor) -> Tensor:
    return -(w * torch.bmm(d, k1a[:, :, None])[:, :, 0]).sum(-1)


def _from_w(d, k1, k2, k1a, w, need_x: bool, need_alpha: bool, with_k2: bool = True):
    g_alpha = _alpha_term(d, k1a, w) if need_alpha else None
    if not need_x:
        return None, g_alpha
    # d is dead after this: reuse its buffer for the result, so that the backward allocates
    # one (B, C, n) tensor in all
    if with_k2:
        wd = torch.bmm(w[:, None, :], d)[:, 0, :]  # w . d_i, (B, n)
        gx = d.mul_((k2 * wd)[:, None, :])
        gx.addcmul_(k1[:, None, :], w[:, :, None])
    else:
        gx = torch.mul(k1[:, None, :], w[:, :, None], out=d)
    return gx, g_alpha


def implicit_grads(x, y, alpha, v, call: PoolCall, need_x, need_alpha):
    """Eq. 10 left to right; H solved by the cheapest exact route (see hessian.py)."""
    penalty = call.penalty
    d, k1, k2, k1a = _terms(x, y, penalty, alpha)
    route = choose_solver(call.implicit_solver, x.shape[2], x.shape[1], penalty.kappa2_zero)
    w, ok = hessian_solve(d, k1, k2, v, route)
    gx, ga = _from_w(d, k1, k2, k1a, w, need_x, need_alpha, with_k2=not penalty.kappa2_zero)
    return Gradients(gx, ga, ~ok)


def approx_grads(x, y, alpha, v, call: PoolCall, need_x, need_alpha):
    """H ~ (sum k1) I and B_j ~ k1_j I: the weights treated as constants."""
    d, k1, k2, k1a = _terms(x, y, call.penalty, alpha)
    w, ok = hessian_solve(d, k1, k2, v, "diagonal")
    gx, ga = _from_w(d, k1, k2, k1a, w, need_x, need_alpha, with_k2=False)
    return Gradients(gx, ga, ~ok)


def full_grads(x, y, alpha, v, call: PoolCall, need_x, need_alpha):
    """Eq. 9 as written: every B_j (C x C) stored, the Jacobian H^-1 B_j formed for all j."""
    d, k1, k2, k1a = _terms(x, y, call.penalty, alpha)
    B, C, n = d.shape
    eye = torch.eye(C, dtype=d.dtype, device=d.device)
    # Bj[b, :, j, :] = k1_j I + k2_j d_j d_j^T, laid out (B, C, n, C) so that the blocks sit
    # side by side as the right-hand sides of one solve
    Bj = k1[:, None, :, None] * eye[None, :, None, :] + (
        k2[:, None, :, None] * d[:, :, :, None] * d.transpose(1, 2)[:, None, :, :]
    )
    H = Bj.sum(2)
    L, ok = factor(H, k1.sum(-1))
    gx = ga = None
    if need_x:
        J = torch.cholesky_solve(Bj.reshape(B, C, n * C), L)  # [H^-1 B_1, ..., H^-1 B_n]
        gx = torch.einsum("bc,bcjk->bkj", v, J.reshape(B, C, n, C))
        gx = torch.where(ok[:, None, None], gx, torch.zeros_like(gx))
    if need_alpha:
        rhs = torch.bmm(d, k1a[:, :, None])
        ga = -(v * torch.cholesky_solve(rhs, L)[:, :, 0]).sum(-1)
        ga = torch.where(ok, ga, torch.zeros_like(ga))
    return Gradients(gx, ga, ~ok)


def _vjp(ctx: BackwardContext, v: Tensor, mode: BackwardMode, gradients) -> tuple:
    """``gradients`` evaluated in the solve's dtype with autocast off; the singular samples
    warned about; dJ/dalpha summed to alpha's shape."""
    x, y, alpha = ctx.saved
    need_x, need_alpha = ctx.needs_input_grad
    with torch.autocast(x.device.type, enabled=False):
        g = gradients(x, y, alpha, v.to(x.dtype), ctx.opts, need_x, need_alpha)
    bad = int(g.singular.sum())
    if bad:
        warnings.warn(
            f"robust_pool ({ctx.opts.penalty.name}, backward_mode={mode.value}): the Hessian "
            f"is singular or indefinite at the solution of {bad} of {x.shape[0]} samples (a "
            "minimiser that is not unique, a saddle point, or a Hessian singular to working "
            "precision); their gradient is set to zero",
            IllConditionedWarning,
            stacklevel=2,
        )
    g_alpha = g.alpha.sum().reshape(alpha.shape) if g.alpha is not None else None
    return g.x, g_alpha


def implicit(ctx: BackwardContext, v: Tensor) -> tuple:
    return _vjp(ctx, v, BackwardMode.IMPLICIT, implicit_grads)


def full(ctx: BackwardContext, v: Tensor) -> tuple:
    return _vjp(ctx, v, BackwardMode.FULL, full_grads)


def approx(ctx: BackwardContext, v: Tensor) -> tuple:
    return _vjp(ctx, v, BackwardMode.APPROX, approx_grads)


BACKWARDS = {
    BackwardMode.IMPLICIT: implicit,
    BackwardMode.FULL: full,
    BackwardMode.APPROX: approx,
    BackwardMode.UNROLL: Unrolled(),
}
"""Each mode's backward; ``unroll`` is autograd through the solver (``solver.solve``)."""
