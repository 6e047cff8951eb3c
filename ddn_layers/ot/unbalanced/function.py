"""Unbalanced optimal transport through the layer skeleton: its LayerSpec and the call that
:func:`ddn_layers.sinkhorn` makes when ``marginal_penalty`` has a finite side."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddn_layers.base import LayerSpec, SolverInfo, run_layer
from ddn_layers.checks import check_tensor, compute_dtype
from ddn_layers.modes import BackwardMode
from ddn_layers.ot.convergence import warn_unconverged
from ddn_layers.ot.unbalanced.backward import BACKWARDS
from ddn_layers.ot.unbalanced.options import UnbalancedOptions
from ddn_layers.ot.unbalanced.solver import solve

SPEC = LayerSpec(
    name="sinkhorn (unbalanced)",
    solve=solve,
    backwards=BACKWARDS,
    extra_keys=("omega", "stages"),
    # full's dense solve is built by differentiable operations; implicit's solves write into
    # buffers (out=), which autograd cannot follow
    twice=frozenset({BackwardMode.FULL, BackwardMode.UNROLL}),
)


def check_masses(x, name: str, B: int | None, size: int, dim_name: str, dtype, device) -> Tensor:
    """A marginal as given (None: uniform, 1 / size), checked and broadcast to (B, size):
    masses are not normalised in the unbalanced problem."""
    if x is None:
        return torch.full((B or 1, size), 1.0 / size, dtype=dtype, device=device)
    if isinstance(x, Tensor) and x.device != device:
        raise ValueError(f"{name} must be on the device of M ({device}), got {x.device}")
    check_tensor(x, name, ndims=(1, 2))
    if x.shape[-1] != size:
        raise ValueError(
            f"{name} must have {size} entries ({dim_name} of M), got shape {tuple(x.shape)}"
        )
    if x.dim() == 2 and (B is None or x.shape[0] != B):
        want = f"({size},) when M is 2-D" if B is None else f"({size},) or ({B}, {size})"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if bool((x < 0).any()):
        raise ValueError(f"{name} must be non-negative (zeros mark padding)")
    x = x.to(dtype)
    x = x.expand(B or 1, size) if x.dim() == 1 else x
    total = x.detach().sum(-1)
    if bool((total <= 0).any()):
        raise ValueError(f"{name} must have a positive entry in every sample (all zeros given)")
    if not bool(torch.isfinite(total).all()):
        raise ValueError(f"{name} must have a finite total mass in every sample")
    return x


def unbalanced_with_options(
    M: Tensor, r: Tensor | None, c: Tensor | None, mode: BackwardMode, opts: UnbalancedOptions
) -> tuple[Tensor, SolverInfo]:
    """The unbalanced problem once M, the mode and the options are checked: P and its
    SolverInfo; shapes and precision as :func:`ddn_layers.sinkhorn`."""
    batched = M.dim() == 3
    B = M.shape[0] if batched else None
    m, n = M.shape[-2:]
    dtype = compute_dtype(M.dtype)
    rr = check_masses(r, "r", B, m, "rows", dtype, M.device)
    cc = check_masses(c, "c", B, n, "columns", dtype, M.device)
    Mb = (M if batched else M.unsqueeze(0)).to(dtype)
    P, info = run_layer(SPEC, mode, opts, Mb, rr, cc)
    if opts.warn:
        _warn_unconverged(info, opts)
    P = P.to(M.dtype)
    return (P if batched else P.squeeze(0)), info


def _warn_unconverged(info: SolverInfo, opts: UnbalancedOptions) -> None:
    # a sample that stopped before max_iter stalled at its precision floor
    layer = f"sinkhorn (unbalanced, marginal_penalty={_pair(opts.marginal_penalty)})"
    warn_unconverged(
        info, info.iterations < opts.max_iter, layer=layer, error="residual", tol=opts.tol,
        max_iter=opts.max_iter, stacklevel=5,
    )  # fmt: skip


def _pair(rho: tuple[float, float]) -> str:
    return "(" + ", ".join("inf" if math.isinf(x) else f"{x:g}" for x in rho) + ")"
