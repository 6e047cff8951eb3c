"""The generic node's backward modes, one entry point each, in the table ``BACKWARDS``.

Every exact mode applies Eq. 3 (see ``kkt.py``) to the incoming gradient; they differ only in
how H is solved: ``implicit`` by CG on Hessian-vector products (``implicit.py``), ``full`` by
Cholesky of the dense H (``dense.py``), ``approx`` with the user's ``hessian_approx`` in
place of H. ``unroll`` lets autograd record the forward solver instead.

Each entry point receives what the forward saved, (y, lam, *inputs), and returns one gradient
per input: None for an input that needs none, and for one that the objective and constraints
never read (as autograd gives an unused input).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ddn_layers.base import BackwardContext, Unrolled
from ddn_layers.generic.dense import full_grads
from ddn_layers.generic.diagnostics import Diagnostics, warn_ill_posed
from ddn_layers.generic.implicit import approx_grads, implicit_grads
from ddn_layers.generic.options import ArgminCall
from ddn_layers.generic.problem import Bound
from ddn_layers.generic.solver import unrolled_solve
from ddn_layers.modes import BackwardMode

Grads = Callable[..., list[Tensor]]
"""``grads(bound, y, lam, v, idx, call, diag)``: dJ/dx for each input in ``idx``."""


def reads(bound: Bound, y: Tensor, idx: Sequence[int]) -> list[bool]:
    """Which of the inputs ``idx`` the objective or constraints depend on at all.

    An input they never touch gets no gradient (None, as autograd gives an unused input)
    rather than a tensor of zeros; the autograd graph of one evaluation tells which.
    """
    with torch.enable_grad():
        xs = list(bound.xs)
        for i in idx:
            xs[i] = xs[i].detach().requires_grad_()
        out = bound.f(y, xs).sum()
        if bound.problem.constrained:
            out = out + bound.h(y, xs).sum()
        if not out.requires_grad:
            return [False] * len(idx)
        grads = torch.autograd.grad(out, [xs[i] for i in idx], allow_unused=True)
    return [g is not None for g in grads]


def _input_grads(ctx: BackwardContext, v: Tensor, grads: Grads) -> tuple[Tensor | None, ...]:
    """Eq. 3 by ``grads`` for the inputs that need a gradient and are read; warns once about
    samples without a well-defined gradient (they get zero)."""
    call: ArgminCall = ctx.opts
    y, lam, *xs = ctx.saved
    out: list[Tensor | None] = [None] * len(xs)
    need = [i for i, n in enumerate(ctx.needs_input_grad) if n]
    if not need:
        return tuple(out)
    B = y.shape[0]
    bound = Bound(call.problem, xs, y.shape)
    yf = y.reshape(B, -1)
    idx = [i for i, used in zip(need, reads(bound, yf, need), strict=True) if used]
    if idx:
        diag = Diagnostics(B, y.device)
        vf = v.reshape(B, -1).to(y.dtype)
        for i, g in zip(idx, grads(bound, yf, lam, vf, idx, call, diag), strict=True):
            out[i] = g
        warn_ill_posed(diag, call)
    return tuple(out)


def implicit(ctx: BackwardContext, v: Tensor) -> tuple[Tensor | None, ...]:
    """Matrix-free: CG on Hessian-vector products, the Schur complement for constraints."""
    return _input_grads(ctx, v, implicit_grads)


def full(ctx: BackwardContext, v: Tensor) -> tuple[Tensor | None, ...]:
    """Dense H, B, A, C from torch.func; Cholesky of H."""
    return _input_grads(ctx, v, full_grads)


def approx(ctx: BackwardContext, v: Tensor) -> tuple[Tensor | None, ...]:
    """The user's ``hessian_approx`` in place of H (constraints and mixed terms exact)."""
    return _input_grads(ctx, v, approx_grads)


BACKWARDS = {
    BackwardMode.IMPLICIT: implicit,
    BackwardMode.FULL: full,
    BackwardMode.APPROX: approx,
    BackwardMode.UNROLL: Unrolled(unrolled_solve),
}
