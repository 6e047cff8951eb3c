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
from ddn_layers.generic.cg import conjugate_gradient
from ddn_layers.generic.options import Options
from ddn_layers.generic.problem import Bound

ARMIJO_C = 1e-4
MAX_HALVINGS = 40


def _line_search(bound: Bound, y: Tensor, d: Tensor, f0: Tensor, slope: Tensor):
    """Step t per sample with f(y + t d) <= f(y) + c t slope, within rounding; and whether one
    was found within MAX_HALVINGS halvings."""
    eps = torch.finfo(y.dtype).eps
    # near the minimum the predicted decrease falls below the rounding error of f itself; a
    # step that does not raise f beyond that error is as good as any there
    slack = 16 * eps * f0.abs()
    t = torch.ones_like(f0)
    ok = torch.zeros_like(f0, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(MAX_HALVINGS):
            f_try = bound.f(y + t[:, None] * d)
            ok = ok | (torch.isfinite(f_try) & (f_try <= f0 + ARMIJO_C * t * slope + slack))
            if bool(ok.all()):
                break
            t = torch.where(ok, t, 0.5 * t)
    return t, ok


def newton_cg(bound: Bound, y0: Tensor, opts: Options) -> tuple[Tensor, SolverInfo]:
    """Minimise the objective from y0 (B, m); returns y and its per-sample record."""
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
        eta = torch.sqrt(gnorm / scale).clamp(max=0.5)
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
        t, ok = _line_search(bound, y.detach(), d.detach(), f0, slope)
        step = active & ok
        y = torch.where(step[:, None], y + t[:, None] * d, y)
        iterations = iterations + step.long()
        g, hvp = bound.hvp(y, None)
        gnorm = g.detach().abs().amax(-1)
        # a failed line search leaves the sample where it is: it stops, unconverged
        active = step & (gnorm > threshold)
    return y, SolverInfo(iterations, gnorm / scale, gnorm <= threshold)
