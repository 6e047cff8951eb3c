"""The matrix-free backward modes, ``implicit`` and ``approx``.

``implicit`` solves with H by conjugate gradients on Hessian-vector products: one
linearisation of grad_y L (torch.func.vjp) and then one backward pass through its graph per
product, so memory stays at a few vectors plus that graph, never the m x m Hessian. When the
user supplies ``hessian_approx``, it preconditions those solves: the paper's "hybrid" advice
(exploit the structure you know, let autodiff do the rest), and on problems whose diagonal
spans many orders of magnitude (optimal transport) what lets CG converge at all (see
``docs/benchmarks/generic/README.md``).

``approx`` replaces H by the user's approximation everywhere in Eq. 3 (the constraints and the
mixed term stay exact).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import vjp

from ddn_layers.generic.diagnostics import Diagnostics
from ddn_layers.generic.kkt import Constraints, cg_inverse, cholesky_inverse, kkt_solve
from ddn_layers.generic.options import ArgminCall
from ddn_layers.generic.problem import Bound
from ddn_layers.linalg import guarded_cholesky


def mixed_products(
    bound: Bound,
    y: Tensor,
    lam: Tensor | None,
    u: Tensor,
    mu: Tensor | None,
    idx: Sequence[int],
) -> list[Tensor]:
    """-(u^T B + mu^T C) for each input in ``idx``: one vjp through (grad_y L, h) in x."""

    def F(*sel: Tensor):
        xs = list(bound.xs)
        for i, t in zip(idx, sel, strict=True):
            xs[i] = t
        g = bound.grad_lagrangian(y, lam, xs)
        return (g, bound.h(y, xs)) if mu is not None else g

    _, pullback = vjp(F, *[bound.xs[i] for i in idx])
    grads = pullback((u, mu) if mu is not None else u)
    return [-g for g in grads]


def user_hessian(bound: Bound, y: Tensor) -> Callable[[Tensor], Tensor]:
    """v -> Ĥ^-1 v for the user's ``hessian_approx`` at y, applied to (..., B, m).

    Accepted values: (B,) for a multiple of the identity per sample, y's shape for a diagonal,
    or (B, m, m) for a dense symmetric positive definite matrix (m = y[0].numel()).
    """
    B, m = bound.B, bound.m
    y_shape = tuple(bound.y_shape)
    value = bound.problem.hessian_approx(*bound.xs, bound.unflat(y))
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise ValueError(
            f"hessian_approx must return a floating-point tensor, got {type(value).__name__}"
        )
    shapes = f"({B},), {y_shape} (a diagonal) or ({B}, {m}, {m})"
    value = value.to(y.dtype)
    if not bool(torch.isfinite(value).all()):
        raise ValueError("hessian_approx returned NaN or infinite values")
    if tuple(value.shape) in ((B,), y_shape):
        d = value.reshape(B, -1)
        if bool((d <= 0).any()):
            raise ValueError(
                "hessian_approx must be positive definite: its diagonal has entries <= 0"
            )
        return lambda v: v / d
    if tuple(value.shape) == (B, m, m):
        L, ok = guarded_cholesky(0.5 * (value + value.mT), pivot_floor=0.0)
        if not bool(ok.all()):
            raise ValueError(
                "hessian_approx must be symmetric positive definite: its Cholesky "
                f"factorisation failed for {int((~ok).sum())} of {B} samples"
            )
        return cholesky_inverse(L)
    raise ValueError(f"hessian_approx must return shape {shapes}, got {tuple(value.shape)}")


def _finish(
    bound: Bound,
    y: Tensor,
    lam: Tensor | None,
    u: Tensor,
    mu: Tensor | None,
    idx: Sequence[int],
    diag: Diagnostics,
) -> list[Tensor]:
    bad = diag.bad
    if bool(bad.any()):
        # a sample without a well-defined derivative contributes nothing rather than noise;
        # the caller warns with the count
        u = torch.where(bad[:, None], 0.0, u)
        mu = None if mu is None else torch.where(bad[:, None], 0.0, mu)
    return mixed_products(bound, y, lam, u, mu, idx)


def implicit_grads(
    bound: Bound,
    y: Tensor,
    lam: Tensor | None,
    v: Tensor,
    idx: Sequence[int],
    opts: ArgminCall,
    diag: Diagnostics,
) -> list[Tensor]:
    """Eq. 3 matrix-free: CG on Hessian-vector products, Schur complement for constraints."""
    _, hvp = bound.hvp(y, lam)
    precond = None
    if bound.problem.hessian_approx is not None and opts.precondition:
        precond = user_hessian(bound, y)
    H_inv = cg_inverse(hvp, precond, opts, diag, "Hessian solve")
    cons = _constraints(bound, y, lam, opts)
    u, mu = kkt_solve(v, H_inv, cons, opts, diag)
    return _finish(bound, y, lam, u, mu, idx, diag)


def approx_grads(
    bound: Bound,
    y: Tensor,
    lam: Tensor | None,
    v: Tensor,
    idx: Sequence[int],
    opts: ArgminCall,
    diag: Diagnostics,
) -> list[Tensor]:
    """Eq. 3 with the user's Hessian approximation in place of H."""
    cons = _constraints(bound, y, lam, opts)
    u, mu = kkt_solve(v, user_hessian(bound, y), cons, opts, diag)
    return _finish(bound, y, lam, u, mu, idx, diag)


def _constraints(bound: Bound, y: Tensor, lam: Tensor | None, opts: ArgminCall):
    if lam is None:
        return None
    p = lam.shape[-1]
    return Constraints(bound, y, p, Constraints.explicit_for(opts, p, bound.B, bound.m))
