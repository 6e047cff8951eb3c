"""The inner loops of the forward Sinkhorn solver: blocks of scaling iterations between checks.

The scalings are a column u (B, m, 1) and a row v (B, 1, n), so that the two matrix-vector
products of an iteration are K @ v^T and u^T @ K, the layouts that batched GEMV handles fast
for any batch size. The loops are written out per case (shared over-relaxation factor, one
factor per sample, plain, padded) because each Python-level call costs a sizeable fraction of
a matrix-vector product at the sizes of interest; the plain and shared-factor blocks run in
place in preallocated buffers, so an iteration allocates nothing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

RESCALE_BELOW = 1e-4
"""|scale| below which the shared-factor block folds a scale back into its vector: the scaled
vectors then stay within a factor 1e4 * 50 of the true scalings (|1 - omega| >= 0.02)."""


def kernel(M: Tensor, gamma: float, f: Tensor, g: Tensor, row_mask, col_mask, lo, padded):
    """exp(-gamma M + f (+) g) with entries below exp(lo) and padded rows/columns set to 0.

    Flushing the tiny entries keeps denormal numbers, which are slow on CPUs, out of the
    matrix-vector products. Padding is zeroed through -inf potentials, not by a mask product:
    an entry that overflowed there would turn 0 * inf into NaN.
    """
    if padded:
        f = torch.where(row_mask > 0, f, -math.inf)
        g = torch.where(col_mask > 0, g, -math.inf)
    K = torch.add(f.unsqueeze(-1), g.unsqueeze(-2))
    K.add_(M, alpha=-gamma).exp_()
    torch.nn.functional.threshold_(K, math.exp(lo), 0.0)
    return K


def kernel_times(K: Tensor, v: Tensor, pad_rows: Tensor | None) -> Tensor:
    """K v as a column (B, m, 1); 1 on padded rows (``pad_rows``), so their scaling stays 1."""
    Kv = torch.bmm(K, v.mT)
    return Kv.add_(pad_rows) if pad_rows is not None else Kv


def kernel_t_times(K: Tensor, u: Tensor, pad_cols: Tensor | None) -> Tensor:
    """K^T u as a row (B, 1, n); 1 on padded columns (``pad_cols``)."""
    Ku = torch.bmm(u.mT, K)
    return Ku.add_(pad_cols) if pad_cols is not None else Ku


def times(x: Tensor, s: float, zero: Tensor, one: Tensor, out=None) -> Tensor:
    """s * x for a host float s (into ``out`` if given), as ``addcmul``'s scalar ``value``:
    ``x * s`` would first wrap s in a tensor and convert it, several dispatches for one
    product."""
    return torch.addcmul(zero, x, one, value=s, out=out)


def shared_factor_block(K, u, v, Kv, u_scale, v_scale, r_col, c_row, w, steps, zero, one, out):
    """``steps`` over-relaxed iterations at one factor ``w`` shared by the batch, each at the
    cost of a plain one: two matrix-vector products and two fused vector operations, all in
    place in the buffers ``out`` = (u~, v~, K v~, K^T u~), which are returned with the scales.

    The scalings are kept as scaled vectors with host scales, u = a u~ and v = b v~ (a =
    ``u_scale``, b = ``v_scale``; K v = b K v~, K^T u = a K^T u~). The update
    u <- w r / K v + (1 - w) u is then u~ <- u~ + (w / (a' b)) r / K v~ with a' = (1 - w) a:
    a single ``addcdiv`` (likewise for v). A scale is folded back into its vector once it
    falls below ``RESCALE_BELOW`` (the scaled vector grows as 1 / |1 - w| a step). The block
    starts from copies of u, v, K v, which stay as they were.
    """
    u_scaled, v_scaled, kv_scaled, ku_scaled = out
    u_scaled.copy_(u)
    v_scaled.copy_(v)
    kv_scaled.copy_(Kv)
    u_row, v_col = u_scaled.mT, v_scaled.mT
    keep = 1.0 - w
    for _ in range(steps):
        if abs(u_scale) < RESCALE_BELOW:
            times(u_scaled, u_scale, zero, one, out=u_scaled)
            u_scale = 1.0
        if abs(v_scale) < RESCALE_BELOW:
            times(v_scaled, v_scale, zero, one, out=v_scaled)
            times(kv_scaled, v_scale, zero, one, out=kv_scaled)
            v_scale = 1.0
        u_scale *= keep
        u_scaled.addcdiv_(r_col, kv_scaled, value=w / (u_scale * v_scale))
        torch.bmm(u_row, K, out=ku_scaled)
        v_scale *= keep
        v_scaled.addcdiv_(c_row, ku_scaled, value=w / (u_scale * v_scale))
        torch.bmm(K, v_col, out=kv_scaled)
    return u_scaled, ku_scaled, v_scaled, kv_scaled, u_scale, v_scale


def per_sample_factor_block(K, u, v, Kv, r_col, c_row, keep_w, steps):
    """``steps`` over-relaxed iterations, u <- w r / K v + (1 - w) u with each sample's own w
    (``keep_w`` = 1 - w, (B, 1, 1)); returns u, K^T u, v, K v."""
    for _ in range(steps):
        u = torch.div(r_col, Kv).lerp_(u, keep_w)
        Ku = torch.bmm(u.mT, K)
        v = torch.div(c_row, Ku).lerp_(v, keep_w)
        Kv = torch.bmm(K, v.mT)  # for the check, then for the next row update
    return u, Ku, v, Kv


def plain_block(K, Kv, r_col, c_row, steps, out):
    """``steps`` plain scaling iterations from K v, in place in the buffers ``out`` (as in
    :func:`shared_factor_block`); returns u, K^T u, v, K v."""
    u, v, Kv_out, Ku = out
    Kv_out.copy_(Kv)
    u_row, v_col = u.mT, v.mT
    for _ in range(steps):
        torch.div(r_col, Kv_out, out=u)
        torch.bmm(u_row, K, out=Ku)
        torch.div(c_row, Ku, out=v)
        torch.bmm(K, v_col, out=Kv_out)
    return u, Ku, v, Kv_out


def padded_block(K, u, v, Kv, r_col, c_row, pad_rows, pad_cols, keep_w, steps):
    """``steps`` iterations of a problem with padding (plain where ``keep_w`` is None, else
    over-relaxed per sample as in :func:`per_sample_factor_block`); returns u, K^T u, v, K v."""
    for _ in range(steps):
        u = torch.div(r_col, Kv) if keep_w is None else torch.div(r_col, Kv).lerp_(u, keep_w)
        Ku = kernel_t_times(K, u, pad_cols)
        v = torch.div(c_row, Ku) if keep_w is None else torch.div(c_row, Ku).lerp_(v, keep_w)
        Kv = kernel_times(K, v, pad_rows)
    return u, Ku, v, Kv


class BlockBuffers:
    """Two sets of (u~, v~, K v~, K^T u~) buffers for the in-place blocks, used in turn: a
    block writes into the set the previous block did not, so the iterate a block started from
    (kept to restore at the check) is never overwritten by it. Reallocated when the active
    batch shrinks."""

    def __init__(self) -> None:
        self.sets: list[tuple[Tensor, ...]] = []
        self.turn = 0

    def take(self, u: Tensor, v: Tensor) -> tuple[Tensor, ...]:
        if not self.sets or self.sets[0][0].shape != u.shape:
            self.sets = [
                tuple(
                    torch.empty_like(x, memory_format=torch.contiguous_format) for x in (u, v, u, v)
                )
                for _ in range(2)
            ]
        self.turn ^= 1
        return self.sets[self.turn]


def masked_logsumexp(x: Tensor, dim: int) -> Tensor:
    """logsumexp that returns -inf (not NaN) for an all -inf slice."""
    mx = x.amax(dim=dim, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    return (x - mx).exp().sum(dim=dim).log() + mx.squeeze(dim)


def log_domain_block(M, gamma, f, g, log_r, log_c, iters):
    """Exact (logsumexp) Sinkhorn iterations on the potentials: slow, never over/underflows.

    Padded rows/columns have log r = -inf and stay at f = -inf (g = -inf).
    """
    logK = M * (-gamma)
    for _ in range(iters):
        f = log_r - masked_logsumexp(logK + g.unsqueeze(-2), dim=-1)
        f = torch.where(torch.isfinite(log_r), f, log_r)
        g = log_c - masked_logsumexp(logK + f.unsqueeze(-1), dim=-2)
        g = torch.where(torch.isfinite(log_c), g, log_c)
    return f, g
