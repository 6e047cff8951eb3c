"""The points of a pooling problem as the solver reads them: centred about their mean.

The iterates are kept centred, yc = y - m about the mean m, and the squared distances come from
||y - x_i||^2 = ||yc||^2 + 2 yc.m + ||x_i - m||^2 - 2 yc.x_i with ||x_i - m||^2 computed once:
the same cancellation as centring the points, at the scale of their spread, without a copy of
them, and one batched GEMM per read of the points.
"""

from __future__ import annotations

import torch
from torch import Tensor

CENTRING_BLOCK = 1 << 17
"""Elements of the offsets x_i - m formed at a time on a CPU: blocks small enough to stay in
memory the allocator reuses (see ``centred_sq_norms``)."""


def centred_sq_norms(x: Tensor, mean: Tensor) -> Tensor:
    """||x_i - m||^2 (B, n) from the explicit offsets, for x (B, C, n) and m (B, C) (the
    identity ||x_i||^2 - 2 m.x_i + ||m||^2 would cancel).

    On a CPU without autograd the offsets are formed a block of channels at a time, squared in
    place and summed into the result: a whole (B, C, n) temporary is a fresh allocation that
    the CPU allocator maps anew whenever it is large or memory was handed back since, and
    every page of it faults when first written; blocks stay in reused memory.
    """
    B, C, n = x.shape
    width = max(1, CENTRING_BLOCK // max(1, B * n))
    if (torch.is_grad_enabled() and x.requires_grad) or x.device.type != "cpu" or width >= C:
        d = x - mean[..., None]
        return (d * d if d.requires_grad else d.square_()).sum(1)
    out = None
    for xb, mb in zip(x.split(width, 1), mean[..., None].split(width, 1), strict=True):
        part = (xb - mb).square_().sum(1)
        out = part if out is None else out.add_(part)
    return out


class CentredPoints:
    """The points x (A, C, n) of the active samples, their mean (A, C) and the centred squared
    norms ||x_i - m||^2 (A, n); iterates are centred, (A, S, C) for S starts a sample."""

    def __init__(self, x: Tensor, mean: Tensor, sq: Tensor) -> None:
        self.x, self.mean, self.sq = x, mean, sq
        # (A, 1, C) and (A, 1, n) terms of every iteration, formed once
        self.mean2, self.neg_mean = 2.0 * mean[:, None, :], -mean[:, None, :]
        self.sq3 = sq[:, None, :]

    @classmethod
    def of(cls, x: Tensor, mean: Tensor) -> CentredPoints:
        return cls(x, mean, centred_sq_norms(x, mean))

    def __getitem__(self, keep: Tensor) -> CentredPoints:
        return CentredPoints(self.x[keep], self.mean[keep], self.sq[keep])

    def sq_distances(self, yc: Tensor) -> Tensor:
        """||y_s - x_i||^2 for centred yc (A, S, C) -> (A, S, n), by one GEMM-sized read of x,
        floored at 0: near a point the identity rounds below zero by up to ~eps |yc| |m|, which
        is not small against alpha^2 when alpha is small (pseudo-huber's weight would be
        1 / sqrt(1 + sq / alpha^2) of a negative)."""
        base = self.sq3 + (yc * (yc + self.mean2)).sum(-1, True)
        return torch.baddbmm(base, yc, self.x, alpha=-2.0).clamp_min(0.0)

    def weighted_mean(self, k1: Tensor, s: Tensor) -> Tensor:
        """sum_i k1_i x_i / s - m, centred, for k1 (A, S, n) and s = sum_i k1_i > 0."""
        return torch.baddbmm(self.neg_mean, k1 / s, self.x.mT)

    def uncentred(self, yc: Tensor) -> Tensor:
        """y = yc + m."""
        return yc - self.neg_mean
