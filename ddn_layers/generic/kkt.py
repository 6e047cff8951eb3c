"""Eq. 3 applied to one incoming gradient: the KKT solve that every exact mode shares.

For a loss gradient v = dJ/dy, Eq. 3 (Gould et al.) gives, with w = H^-1 v,

    dJ/dx = v^T Dy(x) = -u^T B - mu^T C,   mu = S^-1 A w,   u = H^-1 (v - A^T mu),

where S = A H^-1 A^T is the p x p Schur complement of the KKT matrix [[H, A^T], [A, 0]]. So a
backward pass needs solves with H, one solve with S, and one vector-Jacobian product through
(grad_y L, h) for the -u^T B - mu^T C term: never Dy(x), which is m x n per sample.

The modes differ only in how H is solved (``implicit``: CG on Hessian-vector products;
``full``: Cholesky of the dense H; ``approx``: the user's approximation), so they share
:func:`kkt_solve`. The same routine with H = I gives the Lagrange multipliers of a solution,
lam = (A A^T)^-1 A grad f, and the stationarity residual grad f - A^T lam as its ``u``.

Solves with p right-hand sides are batched along a leading axis: a (k, B, m) block holds k
right-hand sides for each of the B samples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import vmap

from ddn_layers.generic.diagnostics import Diagnostics
from ddn_layers.generic.options import EXPLICIT_SCHUR_ENTRIES, ArgminCall
from ddn_layers.generic.problem import Bound
from ddn_layers.linalg import (
    cholesky_solve_vectors,
    conjugate_gradient,
    guarded_cholesky,
    ridge_cholesky,
)


def cholesky_inverse(L: Tensor) -> Callable[[Tensor], Tensor]:
    """v -> (L L^T)^-1 v for factors L (B, m, m), applied to (..., B, m)."""
    return lambda v: cholesky_solve_vectors(L, v)


def batched(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Apply a (B, m) -> (B, m) map to (..., B, m): extra leading axes are vmapped."""

    def apply(v: Tensor) -> Tensor:
        if v.dim() == 2:
            return fn(v)
        lead = v.shape[:-2]
        return vmap(fn)(v.reshape(-1, *v.shape[-2:])).reshape(*lead, *v.shape[-2:])

    return apply


def cg_inverse(
    apply_H: Callable[[Tensor], Tensor],
    precond: Callable[[Tensor], Tensor] | None,
    opts: ArgminCall,
    diag: Diagnostics,
    what: str,
    rtol: float | None = None,
) -> Callable[[Tensor], Tensor]:
    """v -> H^-1 v by conjugate gradients on products with H, recording into ``diag``."""
    op = batched(apply_H)

    def solve(v: Tensor) -> Tensor:
        res = conjugate_gradient(
            op,
            v,
            rtol=opts.cg_tol if rtol is None else rtol,
            max_iter=opts.cg_iters(v.shape[-1]),
            precond=precond,
            check_every=opts.check_every,
        )
        diag.singular |= diag.add_cg(what, res)
        return res.x

    return solve


class Constraints:
    """Products with A = D_y h at the solution, and the choice of Schur complement solver.

    ``explicit``: the p rows of A are formed, (p, B, m), by one vmapped vector-Jacobian
    product; S is then formed from p Hessian solves and factorised by Cholesky. Otherwise A
    is applied matrix-free (a vjp for A^T z, a jvp for A w) and S by CG.
    """

    def __init__(self, bound: Bound, y: Tensor, p: int, explicit: bool) -> None:
        self.p = p
        self.At, self.A = bound.constraint_ops(y)
        self.rows = None
        if explicit:
            eye = torch.eye(p, dtype=y.dtype, device=y.device)
            basis = eye.unsqueeze(1).expand(p, bound.B, p)
            self.rows = vmap(self.At)(basis)

    @classmethod
    def from_rows(cls, rows: Tensor) -> Constraints:
        """Constraints given by the dense rows of A (p, B, m), for the ``full`` mode."""
        self = cls.__new__(cls)
        self.p, self.rows = rows.shape[0], rows
        self.At = lambda z: torch.einsum("ibm,bi->bm", rows, z)
        self.A = lambda w: torch.einsum("ibm,bm->bi", rows, w)
        return self

    @staticmethod
    def explicit_for(opts: ArgminCall, p: int, B: int, m: int) -> bool:
        if opts.implicit_solver == "auto":
            return p * B * m <= EXPLICIT_SCHUR_ENTRIES
        return opts.implicit_solver == "cholesky"


def kkt_solve(
    v: Tensor,
    H_inv: Callable[[Tensor], Tensor],
    cons: Constraints | None,
    opts: ArgminCall,
    diag: Diagnostics,
    what: str = "Schur complement",
) -> tuple[Tensor, Tensor | None]:
    """(u, mu) of the module docstring for v (B, m); mu is None without constraints.

    Samples whose S cannot be factorised are marked rank deficient in ``diag``; their u and
    mu are finite but meaningless, and the caller zeroes them.
    """
    if cons is None:
        return H_inv(v), None
    if cons.rows is not None:
        G = cons.rows
        sol = H_inv(torch.cat([v.unsqueeze(0), G]))
        w, Z = sol[0], sol[1:]
        S = torch.einsum("ibm,jbm->bij", G, Z)
        S = 0.5 * (S + S.mT)
        # a consistent but singular S (an exactly redundant constraint) usually factorises
        # with a pivot at rounding level rather than failing: the default floor catches it
        L, ok = guarded_cholesky(S)
        if not bool(ok.all()):
            diag.rank_deficient |= ~ok
            L = torch.where(ok[:, None, None], L, ridge_cholesky(S)[0])
        a = torch.einsum("ibm,bm->bi", G, w)
        mu = cholesky_solve_vectors(L, a)
        u = w - torch.einsum("ibm,bi->bm", Z, mu)
        return u, mu
    w = H_inv(v)
    a = cons.A(w)
    res = conjugate_gradient(
        lambda z: cons.A(H_inv(cons.At(z))),
        a,
        rtol=opts.cg_tol,
        max_iter=opts.cg_iters(cons.p),
        check_every=opts.check_every,
    )
    # S is PD whenever H is and A has full rank: a flat direction here is a null vector of
    # A^T (a redundant constraint that the Krylov space happened to reach)
    diag.rank_deficient |= diag.add_cg(what, res)
    mu = res.x
    return H_inv(v - cons.At(mu)), mu


def multipliers(
    bound: Bound, y: Tensor, g: Tensor, opts: ArgminCall, diag: Diagnostics
) -> tuple[Tensor, Tensor]:
    """Least-squares Lagrange multipliers lam (B, p) with lam^T A ~ grad f, and the
    stationarity residual grad f - A^T lam (B, m), at a solution y of a constrained problem."""
    p = bound.h(y).shape[-1]
    cons = Constraints(bound, y, p, Constraints.explicit_for(opts, p, bound.B, bound.m))
    residual, lam = kkt_solve(g, lambda v: v, cons, opts, diag, what="multipliers")
    return lam, residual
