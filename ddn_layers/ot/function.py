"""``sinkhorn``: the functional form of the entropic optimal transport layer."""

from __future__ import annotations

import torch
from torch import Tensor

from ddn_layers.base import LayerSpec, SolverInfo, run_layer
from ddn_layers.checks import check_tensor, compute_dtype
from ddn_layers.modes import BackwardMode
from ddn_layers.ot.annealed import solve
from ddn_layers.ot.backward import BACKWARDS
from ddn_layers.ot.convergence import warn_unconverged
from ddn_layers.ot.options import OTOptions
from ddn_layers.ot.unbalanced import UnbalancedOptions, unbalanced_with_options

SPEC = LayerSpec(
    name="sinkhorn",
    solve=solve,
    backwards=BACKWARDS,
    extra_keys=("omega", "rate", "stages", "stalled", "newton_steps"),
    # full's dense solve is built by differentiable operations; implicit's solves write into
    # preallocated buffers (out=), which autograd cannot follow, and approx differentiated
    # again would approximate dP/dM a second time, not differentiate its own first derivative
    twice=frozenset({BackwardMode.FULL, BackwardMode.UNROLL}),
)


def _check_marginal(x, name: str, B: int | None, size: int, dim_name: str, dtype, device):
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
        # the sum of large finite entries overflowed: the marginal is normalised anyway, so
        # dividing by a (detached) constant first changes neither P nor the gradient
        peak = x.detach().amax(-1, keepdim=True)
        x = x / torch.where(torch.isfinite(total).unsqueeze(-1), 1.0, peak)
    return x


def _normalise(x: Tensor) -> Tensor:
    """x / sum(x) with zero gradient for the zero (padding) entries.

    The sum is taken over the positive entries only with a detached mask, so a padded entry
    influences nothing; for the others the gradient is (g - <g, x_hat>) / sum(x).
    """
    mask = (x > 0).to(x.dtype).detach()
    return x / (x * mask).sum(-1, keepdim=True)


def sinkhorn(
    M: Tensor,
    r: Tensor | None = None,
    c: Tensor | None = None,
    *,
    gamma: float = 10.0,
    tol: float = 1e-6,
    max_iter: int = 1000,
    backward_mode: BackwardMode | str = BackwardMode.IMPLICIT,
    implicit_solver: str = "auto",
    check_every: int = 10,
    warn: bool = True,
    marginal_penalty: float | tuple[float, float] | None = None,
    log_plan: bool = False,
    return_info: bool = False,
):
    """Entropy-regularised optimal transport plan, differentiable in M, r and c.

    Solves, per sample,  min_P <P, M> + KL(P || r c^T) / gamma  s.t.  P 1 = r,  P^T 1 = c,
    or with ``marginal_penalty`` the unbalanced problem (below).

    Args:
        M: cost, (B, m, n) or (m, n); m != n allowed.
        r: row marginal, (m,) shared or (B, m) per sample, on M's device; None = uniform.
            Zeros are padding: those rows of P are exactly zero and get zero gradient (for
            sets of different sizes in one batch). Entries below sqrt(smallest normal) of the
            dtype after normalisation (1e-19 in float32) are solved as padding too: their rows
            of P would be flushed to zero anyway (see Returns); they count in the residual.
            Any finite magnitude is accepted: where a sum overflows, r is divided by its
            largest entry first.
        c: column marginal, (n,) or (B, n); None = uniform. Zeros are padding, as for r.
        gamma: inverse regularisation strength (> 0, a number or a one-element tensor without
            grad); any value is numerically safe. It is not differentiated (a tensor that
            requires grad is a ValueError): P depends on M and gamma only through gamma * M,
            so a learned gamma is ``sinkhorn(gamma * M, r, c, gamma=1.0)``. Where gamma
            times the spread of a sample's costs exceeds 500, the forward anneals: it solves
            at gamma / 4^k first and raises gamma stage by stage, each warm-started from the
            last and taking Newton steps on the dual where the error stops halving
            (ot/annealed.py); ``unroll`` runs the single stage.
        tol: convergence tolerance on ||P 1 - r||_1 + ||P^T 1 - c||_1 (marginals normalised),
            measured on the plan returned.
        max_iter: iteration limit per sample, over all annealing stages; a sample that
            does not converge raises a ConvergenceWarning naming how many did not. A sample
            whose error settles above tol at the precision floor of its potentials (large
            gamma in float32) stops there, before max_iter, and the warning gives that floor.
        backward_mode: one of ``ddn.BackwardMode`` (implicit, full, approx, unroll).
            ``approx`` ignores the constraints: the derivative of P with Sinkhorn's scalings
            held fixed, dJ/dM = -gamma P o V, dJ/dr = (P o V) 1 / r, dJ/dc = (P o V)^T 1 / c
            (then the normalisation below). It lacks the exact gradient's removal of the row
            and column means of P o V, so it is close only at small gamma, and for a loss on
            log P (an assignment NLL) it is constant in M and training diverges
            (docs/benchmarks/approx_ot.md). Its r and c gradients are a convention of this
            project; the paper approximates only the M gradient.
        implicit_solver: "cholesky" or "cg" for the Schur complement, or "auto": CG while it
            costs less than the direct solve would (it gives up early otherwise).
        check_every: iterations between convergence checks (each check is one host sync).
        warn: set False to silence the ConvergenceWarning (``return_info`` still reports it).
        marginal_penalty: None (balanced), or rho = a number or a pair (rho_r, rho_c), each
            > 0 or inf (a hard marginal; inf on both sides is the balanced problem): solves
            min_P <P, M> + KL(P || r c^T) / gamma + rho_r KL(P 1 || r) + rho_c KL(P^T 1 || c),
            KL(x || y) = sum x log(x / y) - x + y, the problem of POT's
            ``ot.unbalanced.sinkhorn_unbalanced(r, c, M, reg=1/gamma, reg_m=rho,
            reg_type="kl")``. ``tol`` is then on the residual of its optimality conditions,
            ||P 1 - r exp(-f / (gamma rho_r))||_1 + (likewise for the columns) relative to
            the mass of those targets (f: the row log potentials; the marginal error on a
            hard side); ``extra`` holds ``omega`` and ``stages`` (annealing stages of gamma,
            run where gamma times the spread of M is large). See ddn_layers/ot/unbalanced/.
        log_plan: return log P instead of P (same shape), for losses on log P (an assignment
            NLL) where P underflows: log of the plan where it is positive, else the exponent
            of the potentials, f_i + g_j - gamma M_ij (finite, exact at any gamma), and -inf
            on padding rows/columns (zero or flushed entries of r, c). Every backward mode
            supports it: implicit, full and unroll differentiate log P exactly (the exact
            modes use only P o dJ/dP, which is dJ/d(log P) itself, so entries where P
            underflows keep their gradient); approx is, as for P, the derivative with the
            scalings held fixed: dJ/dM = -gamma W, dJ/dr = W 1 / r, dJ/dc = W^T 1 / c for
            W = dJ/d(log P). The -inf entries are constants: their incoming gradient is
            replaced by 0 (not multiplied by it), so a loss over the real entries, e.g.
            ``-(W * logP)[real].sum()`` or ``torch.where(real, logP, 0)``, never gives NaN.
            In float16 or bfloat16 the float32 log P is cast back (float16 rounds values
            below -65504 to -inf).
        return_info: also return a :class:`~ddn_layers.SolverInfo`, per sample:
            ``iterations`` (all stages); ``residual``, the L1 marginal error of the returned
            plan itself (||P 1 - r||_1 + ||P^T 1 - c||_1 with P as returned, r and c
            normalised); ``converged``, whether that meets tol; ``extra["omega"]`` the
            over-relaxation factor used, ``extra["rate"]`` the estimated rate of plain
            Sinkhorn (0 where none was seen), ``extra["stages"]`` the annealing stages run,
            ``extra["stalled"]`` whether it stopped at its precision floor,
            ``extra["newton_steps"]`` the Newton steps on the dual taken.

    Returns:
        P (log P with ``log_plan``) with the shape of M (and the SolverInfo if
        ``return_info``). Entries below
        sqrt(smallest normal) are flushed to zero. float16/bfloat16 inputs are solved in
        float32 and P is cast back; ``residual`` and ``converged`` then describe the float32
        plan, and rounding to the half format adds at most 2 u + m n d to the returned
        plan's marginal error (u the unit roundoff: 2^-11 for float16, 2^-8 for bfloat16; d
        the spacing of its subnormals: 2^-24 for float16, 2^-133 for bfloat16): about 1e-3
        (float16, up to a few thousand entries) and 8e-3 (bfloat16), whatever tol asked.

    Normalisation: r and c need not sum to one. They are divided by their sums before solving,
    so P always has unit mass and the gradient returned for r is the gradient with respect to
    r / sum(r) multiplied by the Jacobian of that normalisation, (I - r_hat 1^T) / sum(r)
    applied from the left: it is orthogonal to r_hat-weighted constants (scaling r changes
    nothing) and zero on padded entries. Likewise for c.

    With a finite ``marginal_penalty`` r and c are masses, taken as given: not normalised (P
    has the mass the problem gives it, and scaling r or c changes that mass), and their gradients
    are plain partial derivatives, kappa a o (P 1) / r with kappa = 1 + 1 / (gamma rho_r) on a
    soft side (a the row multiplier of the backward's system), the multiplier itself on a
    hard side; zero on padded entries.
    """
    mode = BackwardMode.parse(backward_mode)
    check_tensor(M, "M", ndims=(2, 3))
    opts = OTOptions(
        gamma=gamma,
        tol=tol,
        max_iter=max_iter,
        implicit_solver=implicit_solver,
        check_every=check_every,
        warn=warn,
        marginal_penalty=marginal_penalty,
        log_plan=log_plan,
    )
    P, info = sinkhorn_with_options(M, r, c, mode, opts)
    return (P, info) if return_info else P


def sinkhorn_with_options(
    M: Tensor, r: Tensor | None, c: Tensor | None, mode: BackwardMode, opts: OTOptions
) -> tuple[Tensor, SolverInfo]:
    """:func:`sinkhorn` once M, the mode and the options are checked: P and its SolverInfo.
    The marginals are checked and normalised here, outside the layer's Function, so that
    autograd differentiates the normalisation."""
    if opts.marginal_penalty is not None:  # unbalanced: masses as given, its own layer
        return unbalanced_with_options(M, r, c, mode, UnbalancedOptions.of(opts))
    batched = M.dim() == 3
    B = M.shape[0] if batched else None
    m, n = M.shape[-2:]
    dtype = compute_dtype(M.dtype)
    rr = _normalise(_check_marginal(r, "r", B, m, "rows", dtype, M.device))
    cc = _normalise(_check_marginal(c, "c", B, n, "columns", dtype, M.device))
    Mb = (M if batched else M.unsqueeze(0)).to(dtype)
    P, info = run_layer(SPEC, mode, opts, Mb, rr, cc)
    if opts.warn:
        _warn_unconverged(info, opts)
    P = P.to(M.dtype)
    return (P if batched else P.squeeze(0)), info


def _warn_unconverged(info: SolverInfo, opts: OTOptions) -> None:
    warn_unconverged(
        info, info.extra["stalled"], layer="sinkhorn", error="marginal error", tol=opts.tol,
        max_iter=opts.max_iter, stacklevel=4,
    )  # fmt: skip
