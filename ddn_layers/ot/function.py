"""``sinkhorn`` and ``OptimalTransport``: the entropic optimal transport layer."""

from __future__ import annotations

import warnings

import torch

from ddn_layers.base import DeclarativeLayer, SolverInfo
from ddn_layers.checks import (
    ConvergenceWarning,
    check_choice,
    check_int,
    check_positive,
    check_tensor,
    compute_dtype,
)
from ddn_layers.modes import BackwardMode, first_derivatives_only
from ddn_layers.ot.backward import (
    IMPLICIT_SOLVERS,
    approx_backward,
    full_backward,
    implicit_backward,
)
from ddn_layers.ot.solver import SinkhornSolution, solve_sinkhorn
from ddn_layers.ot.unrolled import unrolled_sinkhorn


class _SinkhornFunction(torch.autograd.Function):
    """P(M, r, c) for normalised r, c; the backward is chosen by ``mode``."""

    @staticmethod
    def forward(ctx, M, r, c, gamma, tol, max_iter, check_every, mode, solver, out):
        sol = solve_sinkhorn(M, r, c, gamma, tol, max_iter, check_every)
        out.append(sol)
        ctx.save_for_backward(sol.P)
        ctx.gamma, ctx.mode, ctx.solver = gamma, mode, solver
        return sol.P

    @staticmethod
    def backward(ctx, V):
        if ctx.mode is not BackwardMode.FULL:
            # implicit's solves write into preallocated buffers (out=), which autograd cannot
            # follow; approx differentiated again would approximate dP/dM a second time, not
            # differentiate its own first derivative
            first_derivatives_only(
                "sinkhorn", ctx.mode, "backward_mode='full' or 'unroll' differentiates twice"
            )
        (P,) = ctx.saved_tensors
        # The marginals P actually has (equal to r, c within tol once converged): the system
        # matrix [[diag(P 1), P], [P^T, diag(P^T 1)]] is then PSD for any P, so a truncated
        # forward (max_iter reached) gets the exact gradient of the problem that P solves.
        r, c = P.sum(-1), P.sum(-2)
        if ctx.mode is BackwardMode.IMPLICIT:
            dM, dr, dc = implicit_backward(P, r, c, V, ctx.gamma, ctx.solver)
        elif ctx.mode is BackwardMode.FULL:
            dM, dr, dc = full_backward(P, r, c, V, ctx.gamma)
        else:
            dM, dr, dc = approx_backward(P, r, c, V, ctx.gamma)
        return dM, dr, dc, None, None, None, None, None, None, None


def _check_marginal(x, name: str, B: int | None, size: int, dim_name: str, dtype, device):
    if x is None:
        return torch.full((B or 1, size), 1.0 / size, dtype=dtype, device=device)
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
    if bool((x.sum(-1) <= 0).any()):
        raise ValueError(f"{name} must have a positive entry in every sample (all zeros given)")
    return x


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """x / sum(x) with zero gradient for the zero (padding) entries.

    The sum is taken over the positive entries only with a detached mask, so a padded entry
    influences nothing; for the others the gradient is (g - <g, x_hat>) / sum(x).
    """
    mask = (x > 0).to(x.dtype).detach()
    return x / (x * mask).sum(-1, keepdim=True)


def sinkhorn(
    M: torch.Tensor,
    r: torch.Tensor | None = None,
    c: torch.Tensor | None = None,
    *,
    gamma: float = 10.0,
    tol: float = 1e-6,
    max_iter: int = 1000,
    backward_mode: BackwardMode | str = BackwardMode.IMPLICIT,
    implicit_solver: str = "auto",
    check_every: int = 10,
    warn: bool = True,
    return_info: bool = False,
):
    """Entropy-regularised optimal transport plan, differentiable in M, r and c.

    Solves, per sample,  min_P <P, M> + KL(P || r c^T) / gamma  s.t.  P 1 = r,  P^T 1 = c.

    Args:
        M: cost, (B, m, n) or (m, n); m != n allowed.
        r: row marginal, (m,) shared or (B, m) per sample; None = uniform. Zeros are padding:
            those rows of P are exactly zero and get zero gradient (for sets of different sizes
            in one batch).
        c: column marginal, (n,) or (B, n); None = uniform. Zeros are padding, as for r.
        gamma: inverse regularisation strength (> 0); any value is numerically safe.
        tol: convergence tolerance on ||P 1 - r||_1 + ||P^T 1 - c||_1 (marginals normalised).
        max_iter: iteration limit per sample; a sample that does not converge raises a
            ConvergenceWarning naming how many did not.
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
        return_info: also return a :class:`~ddn_layers.SolverInfo` (per-sample iterations,
            residual, converged; ``extra["omega"]`` the over-relaxation factor used,
            ``extra["rate"]`` the estimated rate of plain Sinkhorn, 0 where none was seen).

    Returns:
        P with the shape of M (and the SolverInfo if ``return_info``). float16/bfloat16 inputs
        are solved in float32 and P is cast back.

    Normalisation: r and c need not sum to one. They are divided by their sums before solving,
    so P always has unit mass and the gradient returned for r is the gradient with respect to
    r / sum(r) multiplied by the Jacobian of that normalisation, (I - r_hat 1^T) / sum(r)
    applied from the left: it is orthogonal to r_hat-weighted constants (scaling r changes
    nothing) and zero on padded entries. Likewise for c.
    """
    mode = BackwardMode.parse(backward_mode)
    check_tensor(M, "M", ndims=(2, 3))
    gamma = check_positive(gamma, "gamma")
    tol = check_positive(tol, "tol")
    max_iter = check_int(max_iter, "max_iter", 1)
    check_every = check_int(check_every, "check_every", 1)
    check_choice(implicit_solver, "implicit_solver", IMPLICIT_SOLVERS)

    batched = M.dim() == 3
    B = M.shape[0] if batched else None
    m, n = M.shape[-2:]
    in_dtype = M.dtype
    dtype = compute_dtype(in_dtype)
    rr = _check_marginal(r, "r", B, m, "rows", dtype, M.device)
    cc = _check_marginal(c, "c", B, n, "columns", dtype, M.device)
    Mb = (M if batched else M.unsqueeze(0)).to(dtype)
    rr, cc = _normalise(rr), _normalise(cc)

    if mode is BackwardMode.UNROLL:
        sol = unrolled_sinkhorn(Mb, rr, cc, gamma, tol, max_iter, check_every)
        P = sol.P
    else:
        out: list[SinkhornSolution] = []
        P = _SinkhornFunction.apply(
            Mb, rr, cc, gamma, tol, max_iter, check_every, mode, implicit_solver, out
        )
        sol = out[0]

    info = SolverInfo(
        sol.iterations, sol.residual, sol.converged, extra={"omega": sol.omega, "rate": sol.rate}
    )
    if warn:
        n_bad = int((~sol.converged).sum())
        if n_bad:
            stalled = bool((sol.iterations[~sol.converged] < max_iter).any())
            hint = (
                "an unrolled solve stopped where its error stalled at the precision floor: "
                "raise tol or use float64"
                if stalled
                else "raise max_iter or lower gamma"
            )
            warnings.warn(
                f"sinkhorn: {n_bad} of {sol.converged.numel()} sample(s) did not reach "
                f"tol={tol:g} within max_iter={max_iter} (largest marginal error "
                f"{float(sol.residual.max()):.3g}); {hint}",
                ConvergenceWarning,
                stacklevel=2,
            )
    P = P.to(in_dtype)
    if not batched:
        P = P.squeeze(0)
    return (P, info) if return_info else P


class OptimalTransport(DeclarativeLayer):
    """Entropic optimal transport as a module: ``ot(M, r=None, c=None) -> P``.

    Shapes: M (B, m, n) or (m, n); r (m,) or (B, m); c (n,) or (B, n); P like M.
    ``last_info`` holds the per-sample iterations and residuals of the latest call.
    See :func:`sinkhorn` for the arguments.
    """

    def __init__(
        self,
        gamma: float = 10.0,
        tol: float = 1e-6,
        max_iter: int = 1000,
        backward_mode: BackwardMode | str = BackwardMode.IMPLICIT,
        implicit_solver: str = "auto",
        check_every: int = 10,
        warn: bool = True,
    ) -> None:
        super().__init__(backward_mode)
        self.gamma = check_positive(gamma, "gamma")
        self.tol = check_positive(tol, "tol")
        self.max_iter = check_int(max_iter, "max_iter", 1)
        self.implicit_solver = check_choice(implicit_solver, "implicit_solver", IMPLICIT_SOLVERS)
        self.check_every = check_int(check_every, "check_every", 1)
        if not isinstance(warn, bool):
            raise ValueError(f"warn must be True or False, got {warn!r}")
        self.warn = warn

    def forward(self, M, r=None, c=None):
        P, self.last_info = sinkhorn(
            M,
            r,
            c,
            gamma=self.gamma,
            tol=self.tol,
            max_iter=self.max_iter,
            backward_mode=self.backward_mode,
            implicit_solver=self.implicit_solver,
            check_every=self.check_every,
            warn=self.warn,
            return_info=True,
        )
        return P

    def extra_repr(self) -> str:
        return (
            f"gamma={self.gamma}, tol={self.tol}, max_iter={self.max_iter}, "
            f"backward_mode={self.backward_mode.value}, implicit_solver={self.implicit_solver}"
        )
