"""The log-plan output (``log_plan=True``): log P from the potentials, and what the backward
modes need to differentiate it.

The forward returns log P = log of the plan where P is representable and the exponent of the
potentials, f (+) g - gamma M, where it underflowed (finite), -inf on padding. The backward of
every mode receives W = dJ/d(log P); since the exact modes only ever use P o dJ/dP, which is W
itself, no division by P is needed and the entries where P underflowed keep their gradient.
Entries outside the real rows and columns (padding, -inf) are constants: their incoming
gradient is replaced by 0 (not multiplied, so a NaN or inf there cannot leak into the rest).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def flush_floor(dtype: torch.dtype) -> float:
    """Entries of P below sqrt(smallest normal) are flushed to zero (denormals are slow)."""
    return math.sqrt(torch.finfo(dtype).tiny)


def log_plan(P: Tensor, exponent: Tensor) -> Tensor:
    """log P where P > 0, else the potentials' ``exponent`` (-inf on padding); (B, m, n)."""
    return torch.where(P > 0, P.log(), exponent)


def plan_of(logP: Tensor) -> Tensor:
    """P = exp(log P) with the forward's flush, by differentiable operations (``full``'s
    gradient is differentiated again through it)."""
    P = logP.exp()
    return torch.where(P >= flush_floor(P.dtype), P, 0.0)


def masked_weight(W: Tensor, P: Tensor) -> Tensor:
    """dJ/d(log P) with the entries off the real rows and columns of P (padding) set to 0."""
    real = (P.sum(-1) > 0).unsqueeze(-1) & (P.sum(-2) > 0).unsqueeze(-2)
    return torch.where(real, W, 0.0)


def plan_and_weight(saved: Tensor, V: Tensor, log: bool) -> tuple[Tensor, Tensor]:
    """The plan and the incoming gradient a backward works on: (P, dJ/dP) as saved and given,
    or for a log plan (P from log P, dJ/d(log P) masked)."""
    if not log:
        return saved, V
    P = plan_of(saved)
    return P, masked_weight(V, P)
