"""The forward solver: y = argmin_u sum_i phi(||u - x_i||; alpha) for a batch, by IRLS.

Each half-quadratic (IRLS) step minimises the quadratic that majorises the objective at the
current point, y <- sum_i k1_i x_i / sum_i k1_i; for every penalty in penalties.py that never
increases the objective (rho(z^2) concave), so the iteration is monotone without a line search.

Its rate is 1 - lambda_min(H) / sum k1: in high dimension, with offsets spread over many
directions, that is tiny and two or three steps reach float32 accuracy; in low dimension, or
with the points along few directions, it can be slow. A Newton step with the exact Hessian
(solved as in the backward pass, Woodbury when n < C) costs about min(n, C) / 2 IRLS steps,
so a problem tries one only when, at its measured contraction (ratio of successive steps),
IRLS would need more than min(n, C) further steps to reach the tolerance: a safeguarded
Newton finish, paid for only where it pays. The step is kept when the Hessian is positive
definite and the objective does not rise; otherwise the IRLS step is taken.

An IRLS step reads the points twice, both times through a batched GEMM, and never forms the
(C, n) offsets: the iterates are kept centred, yc = y - m about the mean m, and
||y - x_i||^2 = ||yc||^2 + 2 yc.m + ||x_i - m||^2 - 2 yc.x_i with ||x_i - m||^2 computed
exactly once (the same cancellation as centring the points, at the scale of their spread,
without a copy of them). The weights are functions of the squared distances (no square root),
and the objective of each start is read off the distances of its last step.

Each (sample, start) pair is a separate problem. It stops on its own optimality residual:
max_c |grad f(y)|_c / sum_i k1_i, the gradient measured in the metric of the majoriser (the
largest coordinate of the next IRLS step), relative to alpha + max_c |y_c| (the penalty's
length scale, and the scale that bounds the rounding of y). A per-coordinate measure, so that
its rounding floor is a few ulps of y whatever C: the 2-norm of the step, used before, floors
at about sqrt(C) ulps, above the float32 tol 1e-6 from C ~ 2048 with |y| ~ alpha, and such
problems ran to max_iter. Or it stops one evaluation sooner, when the step it is about to take
is predicted to leave a residual below tol / 4: this residual times the larger of the last two
contraction ratios (ratios of the 2-norms of successive IRLS steps). It takes that step, and
the prediction is its recorded residual. On random problems (C = 1 ... 2048, n = 1 ... 1024,
every penalty, alpha 0.01 ... 30; 3912 such predictions in float32 and float64,
scripts/check_pool_prediction.py, results in docs/benchmarks/pool/prediction.md) the residual
then measured never exceeded 0.69 tol; from predictions at tol / 2 it reached 1.1 tol, from
those at tol 3.9 tol.
Converged problems are frozen at once. Every ``check_every`` iterations (a host sync) the
solver stops if all have converged, and drops the samples whose starts all have once at most
half the batch is left (dropping copies the points of the rest, which pays only then).

Non-convex penalties start from the mean, the coordinate-wise median (median.py: on a CPU a
selection network for many short rows, counting for long ones, each where it beats
torch.median: 4 times at the ResNet case, 2.6 at C = 128, s = 64) and optionally the
``restarts`` input points nearest that median, and keep the start of lowest objective.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ddn_layers.checks import ConvergenceWarning, check_finite_by
from ddn_layers.pooling.linalg import choose_solver, hessian_solve
from ddn_layers.pooling.median import coordinate_median
from ddn_layers.pooling.penalties import Penalty

PREDICTED_STOP = 0.25
"""A step predicted to leave a residual below PREDICTED_STOP * tol is the last one (see above)."""

START_NAMES = ("mean", "median")
"""Start indices 0 and 1; index 2 + k is the k-th input point nearest the median."""


@dataclass(frozen=True)
class SolveOptions:
    tol: float
    max_iter: int
    newton: bool
    restarts: int
    implicit_solver: str
    check_every: int
    predict_below: float = PREDICTED_STOP
    """0 turns the predicted stop off (scripts/check_pool_prediction.py measures it so)."""
    objective: bool = True
    """False: a single start's objective, or the closed form's, is not evaluated (NaN)."""


@dataclass
class Solution:
    """The minimiser and a per-sample record of how it was found (tensors of shape (B,))."""

    y: Tensor
    iterations: Tensor
    residual: Tensor
    converged: Tensor
    start: Tensor
    objective: Tensor
    newton_steps: Tensor


def distances(x: Tensor, y: Tensor) -> Tensor:
    """||y - x_i|| with the offsets formed explicitly: x (..., C, n), y (..., C) -> (..., n)."""
    return torch.linalg.vector_norm(y[..., None] - x, dim=-2)


def objective(x: Tensor, y: Tensor, penalty: Penalty, alpha: Tensor) -> Tensor:
    """sum_i phi(||y - x_i||): x (..., C, n), y (..., C) -> (...)."""
    return penalty.phi(distances(x, y), alpha).sum(-1)


def initial_points(x: Tensor, mean: Tensor, penalty: Penalty, restarts: int) -> Tensor:
    """Starts, shape (B, S, C): the mean; for non-convex penalties also the median, etc."""
    if penalty.is_convex:
        return mean[:, None, :]
    median = coordinate_median(x)
    starts = [mean[:, None, :], median[:, None, :]]
    k = min(restarts, x.shape[-1])
    if k > 0:
        idx = distances(x, median).topk(k, dim=-1, largest=False).indices
        starts.append(torch.gather(x, 2, idx[:, None, :].expand(-1, x.shape[1], -1)).mT)
    return torch.cat(starts, dim=1)


HEADROOM = 16.0
"""Squared distances, and their ratios to alpha^2, up to finfo.max / HEADROOM are accepted:
every iterate lies in the hull of the points, so no distance in the solve exceeds twice the
largest from the mean, and no square four times its square."""


def check_range(max_sq: float, alpha: float, dtype: torch.dtype) -> None:
    """ValueError where ``dtype`` cannot hold the squared distances of the solve.

    ``max_sq`` is the largest squared distance of a point from its sample's mean. alpha^2
    must be a normal number (the weights divide by it), and so must the squared distances
    and their ratios to alpha^2 (float32: alpha in about 4.4e-16 ... 4.6e18, points up to
    about 4.6e18 from their mean and 4.6e18 alpha). Beyond that the weights would be 0 / 0 or
    inf / inf: NaN, not a solution.
    """
    fi = torch.finfo(dtype)
    lo, hi = math.sqrt(fi.tiny) * 2.0**12, math.sqrt(fi.max / HEADROOM)
    fix = "pass x in float64, or scale x and alpha together (y scales with them)"
    if not lo <= alpha <= hi:
        raise ValueError(
            f"alpha must lie in [{lo:.3g}, {hi:.3g}] for a solve in {dtype} (alpha^2 must be "
            f"a normal number), got {alpha:.3g}: {fix}"
        )
    spread = math.sqrt(max_sq)
    if not spread <= hi * min(1.0, alpha):
        raise ValueError(
            f"x: its points lie up to {spread:.3g} from their sample's mean ({spread / alpha:.3g} "
            f"alpha), beyond what squared distances in {dtype} hold ({hi * min(1.0, alpha):.3g} "
            f"here): {fix}"
        )


CENTRING_BLOCK = 1 << 17
"""Elements (512 KiB in float32) of the offsets x_i - m formed at a time on a CPU: blocks of
1 MiB and more already fault after memory was handed back (measured 256 KiB ... 1 MiB)."""


def _centred_sq_norms(x: Tensor, mean: Tensor) -> Tensor:
    """||x_i - m||^2 (B, n) from the explicit offsets (the identity ||x_i||^2 - 2 m.x_i +
    ||m||^2 would cancel).

    On a CPU without autograd the offsets are formed a block of channels at a time, squared in
    place and summed into the result. A whole (B, C, n) temporary is a fresh allocation that
    the CPU allocator maps anew whenever it is large (glibc: above 32 MB, always) or memory
    was handed back since (after a training step, an L-BFGS baseline), and every 4 KiB page
    of it faults when first written. At B = 128, C = 2048, 7 x 7 (ResNet-50 features) that is
    12545 faults and 35.5 ms against 14.0 ms in blocks; at the benchmark's ResNet case after
    64 MB were freed, 752 faults and 2.1 against 1.1 ms. Blocks stay in reused memory.
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


class _Points:
    """The points of the active samples, with their mean and centred squared norms.

    The iterates are kept centred (y - mean), so that the distance identity cancels at the
    scale of the spread of the points, not of their offset from the origin.
    """

    def __init__(self, x: Tensor, mean: Tensor, sq: Tensor) -> None:
        self.x, self.mean, self.sq = x, mean, sq
        # (A, 1, C) and (A, 1, n) terms of every iteration, formed once
        self.mean2, self.neg_mean = 2.0 * mean[:, None, :], -mean[:, None, :]
        self.sq3 = sq[:, None, :]

    @classmethod
    def of(cls, x: Tensor, mean: Tensor) -> _Points:
        return cls(x, mean, _centred_sq_norms(x, mean))

    def __getitem__(self, keep: Tensor) -> _Points:
        return _Points(self.x[keep], self.mean[keep], self.sq[keep])

    def sq_distances(self, yc: Tensor) -> Tensor:
        """||y_s - x_i||^2 for centred yc (A, S, C) -> (A, S, n), by one GEMM-sized read of x:
        ||yc||^2 + 2 yc.m + ||x_i - m||^2 - 2 yc.x_i, floored at 0 (near a point the identity
        rounds below zero by up to ~eps |yc| |m|, which is not small against alpha^2 when
        alpha is small: pseudo-huber's weight would be 1/sqrt(1 + sq / alpha^2) of a negative)."""
        base = self.sq3 + (yc * (yc + self.mean2)).sum(-1, True)
        return torch.baddbmm(base, yc, self.x, alpha=-2.0).clamp_min(0.0)

    def weighted_mean(self, k1: Tensor, s: Tensor) -> Tensor:
        """sum_i k1_i x_i / s - m, centred, for k1 (A, S, n) and s = sum_i k1_i > 0."""
        return torch.baddbmm(self.neg_mean, k1 / s, self.x.mT)


def _newton(pts: _Points, yc: Tensor, want: Tensor, penalty, alpha, solver: str):
    """Safeguarded Newton steps for the (sample, start) pairs in ``want`` (A, S) bool.

    Returns the new centred points for those pairs (in ``want.nonzero()`` order) and which
    were taken.
    """
    a, s = want.nonzero(as_tuple=True)
    xs, ys = pts.x[a] - pts.mean[a, :, None], yc[a, s]
    d = ys[:, :, None] - xs
    z = torch.linalg.vector_norm(d, dim=1)
    # the step in units of u = 2^k >= max(z, alpha) per problem (exact: a power of two),
    # where the kappas, H and w are O(1) in z / alpha alone. In the input's units H ~ k2 d d^T
    # carries z^2 / z^3 and autograd through this solve (unroll) squares that again: in
    # float32 from z ~ 1e11 alpha, or z ~ alpha ~ 1e-12, its gradient overflows to NaN
    du, zu, au, unit = d, z, alpha, None
    if penalty.scale_equivariant:
        top = torch.maximum(z.detach().amax(-1), alpha.detach())
        unit = torch.exp2(torch.ceil(torch.log2(top)))[:, None]
        du, zu, au = d / unit[:, :, None], z / unit, alpha / unit
    k1, k2, _ = penalty.scaled_kappas(zu, au)
    g = torch.bmm(du, k1[:, :, None])[:, :, 0]
    w, ok = hessian_solve(du, k1, k2, g, solver)
    y_new = ys - (w if unit is None else w * unit)
    with torch.no_grad():
        take = ok & (objective(xs, y_new, penalty, alpha) <= penalty.phi(z, alpha).sum(-1))
    return y_new, take


def solve(
    x: Tensor,
    alpha: Tensor,
    penalty: Penalty,
    opts: SolveOptions,
    trace: Callable[[int, Tensor, Tensor | None, Tensor], None] | None = None,
) -> Solution:
    """Minimise for every sample of x (B, C, n); differentiable iff autograd is enabled.

    Runs under whatever grad mode the caller chose: ``no_grad`` for the implicit modes,
    enabled for ``unroll`` (then autograd follows every step of the winning start).
    ``trace(it, residual, estimate, measured)``, if given, sees every iteration's (A, S)
    residuals, predicted next residuals (None at it = 0) and measured-converged flags.
    """
    B, C, n = x.shape
    dev = x.device
    mean = x.mean(-1)
    check_finite_by(mean, x, "x")
    if penalty.closed_form:
        zeros = torch.zeros(B, dtype=torch.long, device=dev)
        with torch.no_grad():
            # sum_i ||x_i - m||^2 / 2 from the centred offsets: x.var along the points is
            # 13x slower on CPU (9.5 against 0.73 ms at B=32, C=512, 7x7), for the same value.
            # Only return_info shows it, and it costs more than the mean itself
            if opts.objective:
                f = 0.5 * _centred_sq_norms(x, mean).sum(-1)
            else:
                f = torch.full((B,), math.nan, dtype=x.dtype, device=dev)
        ones = torch.ones(B, dtype=torch.bool, device=dev)
        return Solution(mean, zeros, torch.zeros_like(f), ones, zeros, f, zeros)

    pts_all = _Points.of(x, mean)
    # one host sync for both numbers
    max_sq, a = torch.stack([pts_all.sq.detach().amax(), alpha.detach()]).tolist()
    check_range(max_sq, a, x.dtype)
    Y = initial_points(x, mean, penalty, opts.restarts) - mean[:, None, :]  # (B, S, C)
    S = Y.shape[1]
    use_newton = opts.newton and not penalty.kappa2_zero
    # the Newton test reads the IRLS rate from the last step ratio; for a non-convex penalty
    # the first ratio is often the jump from a start into a basin, not the rate of a slow
    # finish (randn welsch at the ResNet case: Newton tried at it = 1 on 6 of 64 problems,
    # every step rejected), so it waits for a second ratio, as the predicted stop does
    newton_from = 1 if penalty.is_convex else 2
    newton_cost = float(min(n, C))  # in IRLS steps: ~2 Newton steps of min(n, C)/2 each
    solver = choose_solver(opts.implicit_solver, n, C, penalty.kappa2_zero)

    # per-(sample, start) records, written back whenever the active set shrinks
    iters = torch.zeros(B, S, dtype=torch.long, device=dev)
    newton_steps = torch.zeros_like(iters)
    res = torch.full((B, S), float("inf"), dtype=x.dtype, device=dev)
    # with one start the objective only informs (return_info); at a predicted stop it costs
    # a GEMM-sized read of the points
    need_fval = S > 1 or opts.objective
    fval = torch.full((B, S), math.nan, dtype=x.dtype, device=dev)

    idx = torch.arange(B, device=dev)
    pts, ya = pts_all, Y
    iters_a, newton_a = iters.clone(), newton_steps.clone()
    done_a = torch.zeros(B, S, dtype=torch.bool, device=dev)
    # NaN until measured: comparisons with it are False
    prev_step = torch.full((B, S), math.nan, dtype=x.dtype, device=dev)
    prev_rate = prev_step.clone()
    tiny = torch.finfo(x.dtype).tiny

    def write_back():
        # sq was taken at ya before this iteration's update, which is where every problem
        # that stopped on a measured residual still is: its objective comes free. Those that
        # stopped on a predicted one in this iteration have moved since
        if need_fval:
            with torch.no_grad():
                d2 = sq
                if stale is not None:
                    d2 = torch.where(stale[..., None], pts.sq_distances(ya), sq)
                fval[idx] = penalty.phi(d2.sqrt(), alpha).sum(-1)
        iters[idx], newton_steps[idx], res[idx] = iters_a, newton_a, res_a
        return Y.index_copy(0, idx, ya)

    for it in range(opts.max_iter + 1):
        # a convex penalty's one start is the mean, yc = 0: its distances are the centred ones
        sq = pts.sq3 if it == 0 and S == 1 else pts.sq_distances(ya)
        stale = None
        k1 = penalty.irls_weights_sq(sq, alpha)
        s = k1.sum(-1, keepdim=True)
        y_irls = pts.weighted_mean(k1, s.clamp_min(tiny) if penalty.weights_vanish else s)
        if penalty.weights_vanish:
            # s = 0 only when every weight is 0 (truncated quadratic, all points beyond
            # alpha): the objective is flat there, and y is (locally) optimal as it stands
            y_irls = torch.where(s > 0, y_irls, ya)
        with torch.no_grad():
            delta = y_irls - ya
            # the 2-norm of the step gives the contraction rate; the residual is its largest
            # coordinate (abs + amax: vector_norm with ord=inf is 4x slower on CPU in torch
            # 2.14), whose rounding floor does not grow with C as the 2-norm's does
            step = torch.linalg.vector_norm(delta, dim=-1)
            scale = (ya - pts.neg_mean).abs_().amax(-1) + alpha
            res_a = delta.abs_().amax(-1) / scale
            measured = done_a | (res_a <= opts.tol)
            # The residual of the step about to be taken, predicted from the contraction of
            # the last two (the larger: one ratio alone can be a jump between basins): a
            # problem predicted below opts.predict_below * tol takes the step and stops, sparing
            # the evaluation that would only confirm it. Its residual is that prediction
            # (no step ratio at the first iteration: neither this nor the Newton test applies)
            predicted = None
            if it > 0:
                rate = step / prev_step
                # At the second iteration a convex penalty has one ratio, and no basins to
                # jump between: it predicts from that one
                one = it == 1 and penalty.is_convex
                estimate = res_a * (rate if one else torch.maximum(rate, prev_rate))
                predicted = ~measured & (estimate <= opts.predict_below * opts.tol)
                prev_rate = rate
            prev_step = step
            if trace is not None:
                trace(it, res_a, estimate if it > 0 else None, measured)
            if use_newton and it >= newton_from:
                # IRLS steps still needed at the observed rate r: res r^k <= tol. Worth a
                # Newton step when k > newton_cost, i.e. r > (tol / res)^(1 / newton_cost)
                # (r^k itself would underflow, through denormals, slowly). A step that does
                # not shrink (r >= 1) is a jump between basins (non-convex penalties), not a
                # slow finish, and there the Hessian is rarely positive definite: no Newton
                # then. Converged problems (res <= tol: a threshold >= 1) never qualify
                slow = (rate > (opts.tol / res_a).pow_(1.0 / newton_cost)) & (rate < 1)
        if it == opts.max_iter:
            break
        y_next = y_irls
        if use_newton and it >= newton_from and bool(slow.any()):
            y_new, take = _newton(pts, ya, slow, penalty, alpha, solver)
            pick = slow.nonzero(as_tuple=True)
            y_next = y_next.index_put(pick, torch.where(take[:, None], y_new, y_irls[pick]))
            newton_a = newton_a.index_put(pick, newton_a[pick] + take.long())
            # the next step ratio would measure Newton's progress, not the IRLS rate that the
            # predicted stop extrapolates: forget the last step where Newton was taken
            newton_now = torch.zeros_like(measured).index_put(pick, take)
            prev_step = torch.where(newton_now, math.nan, prev_step)
        ya = torch.where(measured[..., None], ya, y_next)
        iters_a += ~measured
        if predicted is None:
            done_a = measured
        else:
            res_a = torch.where(predicted, estimate, res_a)
            done_a, stale = measured | predicted, predicted

        if (it + 1) % opts.check_every == 0:
            keep = ~done_a.all(-1)
            n_keep = int(keep.sum())
            # dropping samples copies the points of the rest: worth it once at most half
            # remain (a frozen sample otherwise costs only its share of the GEMMs)
            if n_keep == 0:
                break
            if 2 * n_keep <= keep.numel():
                Y = write_back()
                idx, pts, ya = idx[keep], pts[keep], ya[keep]
                iters_a, newton_a, done_a = iters_a[keep], newton_a[keep], done_a[keep]
                prev_step, prev_rate = prev_step[keep], prev_rate[keep]
    # the loop always leaves by a break: at max_iter, or with every problem converged
    Y = write_back() + mean[:, None, :]

    best = fval.argmin(dim=1)  # ties go to the earlier start: the mean first
    rows = torch.arange(B, device=dev)
    converged = res[rows, best] <= opts.tol
    if not bool(converged.all()):
        bad = int((~converged).sum())
        warnings.warn(
            f"robust_pool ({penalty.name}): {bad} of {B} samples did not converge in "
            f"max_iter={opts.max_iter} iterations (largest residual "
            f"{float(res[rows, best].max()):.3g} > tol={opts.tol:g}); raise max_iter or tol",
            ConvergenceWarning,
            stacklevel=4,
        )
    return Solution(
        y=Y[rows, best],
        iterations=iters[rows, best],
        residual=res[rows, best],
        converged=converged,
        start=best,
        objective=fval[rows, best],
        newton_steps=newton_steps[rows, best],
    )
