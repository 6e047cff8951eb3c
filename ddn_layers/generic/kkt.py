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

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.func import vmap

from ddn_layers.linalg import CGResult, conjugate_gradient
from ddn_layers.generic.options import EXPLICIT_SCHUR_ENTRIES, Options
from ddn_layers.generic.problem import Bound


@dataclass
class Diagnostics:
    """What went wrong in a solve, gathered per sample so that the caller warns once."""

    B: int
    device: torch.device
    singular: Tensor = field(init=False)
    """H not positive definite (or numerically singular) at the sample's solution."""
    rank_deficient: Tensor = field(init=False)
    """A H^-1 A^T (or A A^T) singular: the constraint Jacobian A is rank deficient."""
    cg: dict[str, list[int | float]] = field(default_factory=dict)
    """Per kind of solve: [systems not converged, systems solved, worst relative residual]."""

    def __post_init__(self) -> None:
        self.singular = torch.zeros(self.B, dtype=torch.bool, device=self.device)
        self.rank_deficient = torch.zeros_like(self.singular)

    def add_cg(self, what: str, res: CGResult) -> Tensor:
        """Record a CG run; returns per sample whether any of its systems met a flat or
        negative curvature (what that means is the caller's to say)."""
        unconverged = ~res.converged & ~res.indefinite
        entry = self.cg.setdefault(what, [0, 0, 0.0])
        entry[0] += int(unconverged.sum())
        entry[1] += unconverged.numel()
        if bool(unconverged.any()):
            entry[2] = max(entry[2], float(res.residual[unconverged].max()))
        # leading axes other than the batch are right-hand sides of the same sample
        return res.indefinite.reshape(-1, self.B).any(0)

    @property
    def bad(self) -> Tensor:
        return self.singular | self.rank_deficient


def cholesky_inverse(L: Tensor) -> Callable[[Tensor], Tensor]:
    """v -> (L L^T)^-1 v for a factor L (B, m, m), applied to (..., B, m).

    Extra leading axes become columns of one right-hand side per sample: cholesky_solve
    would broadcast them by copying L once per right-hand side.
    """

    def solve(v: Tensor) -> Tensor:
        if v.dim() == 2:
            return torch.cholesky_solve(v.unsqueeze(-1), L).squeeze(-1)
        lead, (B, m) = v.shape[:-2], v.shape[-2:]
        cols = v.reshape(-1, B, m).permute(1, 2, 0)
        return torch.cholesky_solve(cols, L).permute(2, 0, 1).reshape(*lead, B, m)

    return solve


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
    opts: Options,
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
    def explicit_for(opts: Options, p: int, B: int, m: int) -> bool:
        if opts.implicit_solver == "auto":
            return p * B * m <= EXPLICIT_SCHUR_ENTRIES
        return opts.implicit_solver == "cholesky"


def _pivot_ok(L: Tensor, info: Tensor) -> Tensor:
    """Per sample: the factorisation succeeded and no pivot is at rounding level.

    cholesky_ex reports only outright failure; a consistent but singular S (an exactly
    redundant constraint) usually factorises with a pivot of order eps instead.
    """
    d = torch.diagonal(L, dim1=-2, dim2=-1) ** 2
    eps = torch.finfo(L.dtype).eps
    tiny = d.amin(-1) <= 64 * d.shape[-1] * eps * d.amax(-1)
    return (info == 0) & ~tiny & torch.isfinite(d).all(-1)


def _regularised_factor(S: Tensor) -> Tensor:
    """Cholesky factor of S + sqrt(eps) mean(diag S) I, or of I where even that fails.

    For a singular S (redundant constraints) this gives a least-squares solution of small
    norm, so that the residuals computed from it still mean something; the samples are
    flagged either way.
    """
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    shift = math.sqrt(torch.finfo(S.dtype).eps) * torch.diagonal(S, dim1=-2, dim2=-1).mean(-1)
    L, info = torch.linalg.cholesky_ex(S + shift.clamp(min=0)[:, None, None] * eye)
    return torch.where((info == 0)[:, None, None], L, eye)


def kkt_solve(
    v: Tensor,
    H_inv: Callable[[Tensor], Tensor],
    cons: Constraints | None,
    opts: Options,
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
        L, info = torch.linalg.cholesky_ex(S)
        ok = _pivot_ok(L, info)
        if not bool(ok.all()):
            diag.rank_deficient |= ~ok
            L = torch.where(ok[:, None, None], L, _regularised_factor(S))
        a = torch.einsum("ibm,bm->bi", G, w)
        mu = torch.cholesky_solve(a.unsqueeze(-1), L).squeeze(-1)
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
    bound: Bound, y: Tensor, g: Tensor, opts: Options, diag: Diagnostics
) -> tuple[Tensor, Tensor]:
    """Least-squares Lagrange multipliers lam (B, p) with lam^T A ~ grad f, and the
    stationarity residual grad f - A^T lam (B, m), at a solution y of a constrained problem."""
    p = bound.h(y).shape[-1]
    cons = Constraints(bound, y, p, Constraints.explicit_for(opts, p, bound.B, bound.m))
    residual, lam = kkt_solve(g, lambda v: v, cons, opts, diag, what="multipliers")
    return lam, residual
