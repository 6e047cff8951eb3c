"""The default forward solver of an unconstrained node: batched, line-searched Newton-CG.

Per sample: a Newton step from conjugate gradients on Hessian-vector products (truncated at
the forcing tolerance min(1/2, sqrt(relative gradient)) for superlinear convergence without
over-solving early steps, and at negative curvature, where the last iterate, or the steepest
descent direction if there is none, is still a descent direction), then a backtracking
Armijo line search. Samples stop one by one when ||grad f||_inf <= tol (1 + ||grad f(y0)||_inf)
and are then held fixed. Nothing here needs autograd outside torch.func, so the forward runs
under ``torch.no_grad``; with grad enabled (``unroll``) the same iterations are
differentiable, step lengths excepted (they are piecewise constant).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddn_layers.base import SolverInfo
from ddn_layers.linalg import conjugate_gradient
from ddn_layers.generic.options import Options
from ddn_layers.generic.problem import Bound

ARMIJO_C = 1e-4
MAX_HALVINGS = 40
NOISE = 1e3
"""A predicted decrease below NOISE * eps * |f| is lost in the rounding of f itself."""


def _line_search(bound: Bound, y: Tensor, d: Tensor, f0: Tensor, slope: Tensor, skip: Tensor):
    """Step t per sample with f(y + t d) <= f(y) + c t slope; and whether one was found within
    MAX_HALVINGS halvings. Samples in ``skip`` take t = 1 unchecked."""
    t = torch.ones_like(f0)
    ok = skip.clone()
    with torch.no_grad():
        for _ in range(MAX_HALVINGS):
            if bool(ok.all()):
                break
            f_try = bound.f(y + t[:, None] * d)
            ok = ok | (torch.isfinite(f_try) & (f_try <= f0 + ARMIJO_C * t * slope))
            t = torch.where(ok, t, 0.5 * t)
    return t, ok


def newton_cg(bound: Bound, y0: Tensor, opts: Options) -> tuple[Tensor, SolverInfo]:
    """Minimise the objective from y0 (B, m); returns y and its per-sample record.

    Near the minimum the decrease a Newton step predicts drops below the rounding error of
    f, and comparing values of f decides nothing. There the full step is taken if it does
    not increase the gradient norm (Newton steps shrink it quadratically), and a sample
    whose step would is at its rounding floor: it stops, converged only if within tol.
    """
    eps = torch.finfo(y0.dtype).eps
    y = y0
    g, hvp = bound.hvp(y, None)
    gnorm = g.detach().abs().amax(-1)
    scale = 1.0 + gnorm
    threshold = opts.tol * scale
    active = gnorm > threshold
    iterations = torch.zeros(bound.B, dtype=torch.long, device=y.device)
    for k in range(opts.max_iter):
        if k % opts.check_every == 0 and not bool(active.any()):
            break
        eta = torch.sqrt(gnorm / scale).clamp(max=0.1)
        res = conjugate_gradient(
            hvp, -g, rtol=eta, max_iter=opts.cg_iters(bound.m), check_every=opts.check_every
        )
        d = res.x
        slope = (g.detach() * d.detach()).sum(-1)
        # no usable Newton direction: CG met negative curvature before its first step
        fallback = (slope >= 0)[:, None]
        d = torch.where(fallback, -g, d)
        slope = torch.where(fallback[:, 0], -(g.detach() ** 2).sum(-1), slope)
        with torch.no_grad():
            f0 = bound.f(y.detach())
        noise = slope.abs() <= NOISE * eps * f0.abs()
        t, ok = _line_search(bound, y.detach(), d.detach(), f0, slope, skip=noise)
        step = active & ok
        y_new = torch.where(step[:, None], y + t[:, None] * d, y)
        g_new, hvp_new = bound.hvp(y_new, None)
        gnorm_new = g_new.detach().abs().amax(-1)
        floor = step & noise & (gnorm_new > gnorm)
        if bool(floor.any()):
            y_new = torch.where(floor[:, None], y, y_new)
            g_new, hvp_new = bound.hvp(y_new, None)
            gnorm_new = g_new.detach().abs().amax(-1)
        y, g, hvp, gnorm = y_new, g_new, hvp_new, gnorm_new
        moved = step & ~floor
        iterations = iterations + moved.long()
        # a failed line search, or the rounding floor, leaves the sample where it is: it stops
        active = moved & (gnorm > threshold)
    return y, SolverInfo(iterations, gnorm / scale, gnorm <= threshold)
