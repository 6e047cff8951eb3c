"""The ``full`` backward: Eq. 3 with its matrices formed densely, as a generic tool would.

H (m x m), B (m x n), A (p x m) and C (p x n) are built per sample from torch.func
vector-Jacobian products of basis vectors, H is factorised by Cholesky, and Eq. 3 is applied
to the incoming gradient through the same Schur complement algebra as the other modes. This
is the unstructured baseline: O(m^2 + m n) memory per sample and m products to build it,
which is what ``implicit`` avoids and what a specialised layer should be checked against.

Rows are built a chunk at a time into preallocated buffers, so the peak is the matrices
themselves plus one chunk of vmapped products, not twice the matrices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import vjp, vmap

from ddn_layers.generic.diagnostics import Diagnostics
from ddn_layers.generic.kkt import Constraints, cholesky_inverse, kkt_solve
from ddn_layers.generic.options import ArgminCall
from ddn_layers.generic.problem import Bound
from ddn_layers.linalg import guarded_cholesky

CHUNK_ENTRIES = 2**22
"""Entries of vmapped products per chunk: bounds the transient memory of building the rows."""


def _rows(
    pullback: Callable[[Tensor], tuple[Tensor, ...]],
    count: int,
    like: Sequence[Tensor],
) -> list[Tensor]:
    """Rows k = 0..count-1 of the Jacobians whose vjp is ``pullback``, for every sample.

    The cotangent e_k placed in every sample at once gives row k of each sample's Jacobian in
    one product, because sample b of the function reads only sample b (see problem.py).
    Returns one (count, *t.shape) tensor per output t of ``like``.
    """
    B = like[0].shape[0]
    dtype, device = like[0].dtype, like[0].device
    outs = [torch.empty(count, *t.shape, dtype=t.dtype, device=t.device) for t in like]
    per_row = sum(t.numel() for t in like)
    chunk = max(1, min(count, CHUNK_ENTRIES // max(per_row, 1)))
    for k0 in range(0, count, chunk):
        k1 = min(count, k0 + chunk)
        idx = torch.arange(k0, k1, device=device)
        E = torch.zeros(k1 - k0, B, count, dtype=dtype, device=device)
        E[torch.arange(k1 - k0, device=device), :, idx] = 1.0
        for out, piece in zip(outs, vmap(pullback)(E), strict=True):
            out[k0:k1] = piece
    return outs


def full_grads(
    bound: Bound,
    y: Tensor,
    lam: Tensor | None,
    v: Tensor,
    idx: Sequence[int],
    opts: ArgminCall,
    diag: Diagnostics,
) -> list[Tensor]:
    B, m = bound.B, bound.m
    xs_sel = [bound.xs[i] for i in idx]

    def with_inputs(sel: Sequence[Tensor]) -> list[Tensor]:
        xs = list(bound.xs)
        for i, t in zip(idx, sel, strict=True):
            xs[i] = t
        return xs

    # rows of [H | B_1 | B_2 ...]: the derivative of grad_y L in (y, x_1, x_2, ...)
    _, pull_L = vjp(lambda u, *sel: bound.grad_lagrangian(u, lam, with_inputs(sel)), y, *xs_sel)
    H_rows, *B_rows = _rows(pull_L, m, [y, *xs_sel])
    # Cholesky reads one triangle only, so H (symmetric up to rounding) needs no symmetrising;
    # only an outright failure is singular (no pivot floor: H's own scales may span decades)
    L, ok = guarded_cholesky(H_rows.transpose(0, 1), pivot_floor=0.0)
    del H_rows
    diag.singular |= ~ok

    H_inv = cholesky_inverse(L)
    cons, C_rows = None, [None] * len(idx)
    if lam is not None:
        p = lam.shape[-1]
        _, pull_h = vjp(lambda u, *sel: bound.h(u, with_inputs(sel)), y, *xs_sel)
        A_rows, *C_rows = _rows(pull_h, p, [y, *xs_sel])
        cons = Constraints.from_rows(A_rows)

    u, mu = kkt_solve(v, H_inv, cons, opts, diag)
    bad = diag.bad
    u = torch.where(bad[:, None], 0.0, u)
    grads = []
    for x, Bk, Ck in zip(xs_sel, B_rows, C_rows, strict=True):
        g = -torch.einsum("kbn,bk->bn", Bk.reshape(m, B, -1), u)
        if Ck is not None:
            mu_ok = torch.where(bad[:, None], 0.0, mu)
            g = g - torch.einsum("jbn,bj->bn", Ck.reshape(Ck.shape[0], B, -1), mu_ok)
        grads.append(g.reshape(x.shape))
    return grads
