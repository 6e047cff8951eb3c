"""The forward solver: y = argmin_u sum_i phi(||u - x_i||; alpha) for a batch, by IRLS.

Each half-quadratic (IRLS) step minimises the quadratic that majorises the objective at the
current point, y <- sum_i k1_i x_i / sum_i k1_i; for every penalty in penalties.py that never
increases the objective (rho(z^2) concave), so the iteration is monotone without a line search.

Its rate is 1 - lambda_min(H) / sum k1: in high dimension, with offsets spread over many
directions, that is tiny and a few steps reach float32 accuracy; in low dimension, or with the
points along few directions, it can be slow. A Newton step with the exact Hessian (solved as in
the backward pass, Woodbury when n < C) costs about min(n, C) / 2 IRLS steps, so a problem
tries one only when, at its measured contraction (ratio of successive steps), IRLS would need
more than min(n, C) further steps to reach the tolerance: a safeguarded Newton finish, paid
for only where it pays. The step is kept when the Hessian is positive definite and the
objective does not rise; otherwise the IRLS step is taken.

An IRLS step reads the points twice, both times through a batched GEMM, and never forms the
(C, n) offsets (points.py). The weights are functions of the squared distances (no square
root), and the objective of each start is read off the distances of its last step.

Each (sample, start) pair is a separate problem. It stops on its own optimality residual:
max_c |grad f(y)|_c / sum_i k1_i, the gradient measured in the metric of the majoriser (the
largest coordinate of the next IRLS step), relative to alpha + max_c |y_c| (the penalty's
length scale, and the scale that bounds the rounding of y). A per-coordinate measure, so that
its rounding floor is a few ulps of y whatever C (the 2-norm's grows as sqrt(C)). Or it stops
one evaluation sooner, when the step it is about to take is predicted to leave a residual
below ``PREDICTED_STOP * tol``: this residual times the larger of the last two contraction
ratios. It takes that step, and the prediction is its recorded residual (how far such a
prediction can be trusted: ``scripts/check_pool_prediction.py``).

Converged problems are frozen at once. Every ``check_every`` iterations (a host sync) the
solver stops if all have converged, and drops the samples whose starts all have once at most
half the batch is left (dropping copies the points of the rest, which pays only then).

Non-convex penalties start from the mean, the coordinate-wise median (median.py) and
optionally the ``restarts`` input points nearest that median, and keep the start of lowest
objective. Their penalties are bounded by phi_max = phi(inf), so every input point scores at
most (n - 1) phi_max. A start that scores more is worse than every input point, and may be
flat (truncated quadratic with every point beyond alpha: no weight for IRLS to move with;
Welsch with every term near its cap): it begins instead at an input point, the best of a few
nearest the mean. Since IRLS never rises, no start ends worse than every input point, or
flat. Problems of at most :data:`EVERY_POINT` points also compare y with every input point
after the solve, and iterate again from one that scores lower; larger ones keep the local
minimum their starts reach.

The steps of an iteration (:func:`irls_step`, :func:`step_and_residual`,
:func:`predicted_residual`, :func:`newton_pays`, :func:`newton_step`) are public, so that a
study of the stopping rule can run the same iteration without the stop.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ddn_layers.base import Solved, SolverInfo
from ddn_layers.checks import ConvergenceWarning, check_tensor
from ddn_layers.pooling.hessian import choose_solver, hessian_solve
from ddn_layers.pooling.median import coordinate_median
from ddn_layers.pooling.options import PoolCall
from ddn_layers.pooling.penalties import Penalty
from ddn_layers.pooling.points import CentredPoints, centred_sq_norms

PREDICTED_STOP = 0.25
"""A step predicted to leave a residual below PREDICTED_STOP * tol is the last one (see above)."""

START_NAMES = ("mean", "median")
"""Start indices 0 and 1; index 2 + k is the k-th input point nearest the median, and index
2 + restarts the input point that the final check of small problems restarted from."""

EVERY_POINT = 8
"""Non-convex problems of at most EVERY_POINT points also evaluate the objective at every input
point after the solve and, where one scores lower than y, iterate once more from the lowest:
then y is never worse than an input point. There that costs about what an iteration costs in
dispatch; for more points the pairwise distances would cost more than the solve."""

CANDIDATES = 8
"""A start worse than every input point moves to the best of the CANDIDATES input points nearest
the mean: one row of distances each, where the nearest alone is often an outlier."""

SITS_ON = 64.0
"""y sits on an input point when their squared distance, as the distance identity computes it
(points.py), is below SITS_ON eps (||x_i - m||^2 + ||y - m||^2), that identity's rounding:
restarting from that point would return y."""

MARGIN = 16.0
"""Objectives closer than MARGIN eps of their size count as equal (the rounding of the sum):
where the points are isolated (randn in many channels) every input point scores the same
(n - 1) phi_max, and a restart between such ties would only cost time."""

HEADROOM = 16.0
"""Squared distances, and their ratios to alpha^2, up to finfo.max / HEADROOM are accepted:
every iterate lies in the hull of the points, so no distance in the solve exceeds twice the
largest from the mean, and no square four times its square."""


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
    fix = "scale x and alpha together (y scales with them)"
    if fi.max < torch.finfo(torch.float64).max:
        # float64 is the widest dtype the solve takes: advising it there would be no way out
        fix = f"pass x in float64, or {fix}"
    if not lo <= alpha <= hi:
        raise ValueError(
            f"alpha must lie in [{lo:.3g}, {hi:.3g}] for a solve in {dtype} (alpha^2 must be "
            f"a normal number), got {alpha:.3g}: {fix}"
        )
    spread = math.sqrt(max_sq)
    if not spread <= hi * min(1.0, alpha):
        where = f"up to {spread:.3g} from their sample's mean ({spread / alpha:.3g} alpha)"
        if not math.isfinite(spread):
            where = f"so far from their sample's mean that the square overflows {dtype}"
        raise ValueError(
            f"x: its points lie {where}, beyond what squared distances in {dtype} hold "
            f"({hi * min(1.0, alpha):.3g} here): {fix}"
        )


# ---------------------------------------------------------------------------------------------
# The steps of one iteration, on centred iterates yc (A, S, C) of the points ``pts``


def irls_step(
    pts: CentredPoints, yc: Tensor, sq: Tensor, penalty: Penalty, alpha: Tensor
) -> Tensor:
    """The IRLS (half-quadratic) update of yc, given its squared distances sq (A, S, n)."""
    k1 = penalty.irls_weights_sq(sq, alpha)
    s = k1.sum(-1, keepdim=True)
    if not penalty.weights_vanish:
        return pts.weighted_mean(k1, s)
    y_irls = pts.weighted_mean(k1, s.clamp_min(torch.finfo(sq.dtype).tiny))
    # s = 0 only when every weight is 0 (truncated quadratic, all points beyond alpha): the
    # objective is flat there, and y is (locally) optimal as it stands
    return torch.where(s > 0, y_irls, yc)


def step_and_residual(
    pts: CentredPoints, yc: Tensor, y_irls: Tensor, alpha: Tensor
) -> tuple[Tensor, Tensor]:
    """The 2-norm of the IRLS step (its ratios give the contraction rate) and the residual:
    the step's largest coordinate (whose rounding floor does not grow with C) over
    alpha + max_c |y_c|. Both (A, S); call without autograd."""
    delta = y_irls - yc
    step = torch.linalg.vector_norm(delta, dim=-1)
    scale = pts.uncentred(yc).abs_().amax(-1) + alpha
    # abs + amax rather than vector_norm(ord=inf), which is slower on a CPU
    return step, delta.abs_().amax(-1) / scale


def predicted_residual(residual: Tensor, rate: Tensor, prev_rate: Tensor, one: bool) -> Tensor:
    """The residual the step about to be taken will leave: ``residual`` times the larger of
    the last two step ratios (one ratio alone can be a jump between basins), or times the last
    one alone where ``one`` (a convex penalty's first ratio: no basins to jump between)."""
    return residual * (rate if one else torch.maximum(rate, prev_rate))


def newton_pays(rate: Tensor, residual: Tensor, tol: float, cost: float) -> Tensor:
    """Whether a Newton step is cheaper than the IRLS steps still needed at the observed rate.

    IRLS needs k steps with residual r^k <= tol: a Newton step pays when k > ``cost`` (in IRLS
    steps), i.e. r > (tol / residual)^(1 / cost), which does not underflow as r^k would. A
    step that does not shrink (r >= 1) is a jump between basins (non-convex penalties), not a
    slow finish, and there the Hessian is rarely positive definite: no Newton then. Converged
    problems (residual <= tol: a threshold >= 1) never qualify.
    """
    return (rate > (tol / residual).pow_(1.0 / cost)) & (rate < 1)


def newton_cost(n: int, c: int) -> float:
    """A Newton step's cost in IRLS steps: about two of min(n, C) / 2 each."""
    return float(min(n, c))


def first_newton_iteration(penalty: Penalty) -> int:
    """The Newton test reads the IRLS rate from the last step ratio; for a non-convex penalty
    the first ratio is often the jump from a start into a basin, not the rate of a slow finish,
    so it waits for a second ratio, as the predicted stop does."""
    return 1 if penalty.is_convex else 2


def newton_step(
    pts: CentredPoints, yc: Tensor, want: Tensor, penalty: Penalty, alpha: Tensor, solver: str
) -> tuple[Tensor, Tensor]:
    """Safeguarded Newton steps for the (sample, start) pairs in ``want`` (A, S) bool.

    Returns the new centred points for those pairs (in ``want.nonzero()`` order) and which
    were taken: those where the Hessian is positive definite and the objective does not rise.
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


# ---------------------------------------------------------------------------------------------
# The solve


def _phi_max(penalty: Penalty, alpha: float) -> float:
    """sup phi (at z = inf), inf or NaN where phi is unbounded. Cached where the penalty is
    hashable (every penalty of Table 1): a layer calls it with one alpha, and the 0-d tensor
    operations that compute it are pure dispatch."""
    if type(penalty).__hash__ is None:
        return _phi_at_inf(penalty, alpha)
    return _phi_at_inf_cached(penalty, alpha)


def _phi_at_inf(penalty: Penalty, alpha: float) -> float:
    inf, a = torch.tensor(math.inf, dtype=torch.float64), torch.tensor(alpha, dtype=torch.float64)
    return float(penalty.phi(inf, a))


_phi_at_inf_cached = functools.lru_cache(maxsize=256)(_phi_at_inf)


@dataclass(frozen=True)
class _Plan:
    """What stays fixed during one solve."""

    call: PoolCall
    alpha: Tensor
    starts: int
    use_newton: bool
    newton_from: int
    newton_cost: float
    solver: str
    need_objective: bool
    every_point: bool
    phi_max: float

    @classmethod
    def of(cls, call: PoolCall, alpha: Tensor, n: int, c: int, starts: int, a: float) -> _Plan:
        """``a``: alpha as a number (for phi_max, the bound of a non-convex penalty)."""
        penalty = call.penalty
        return cls(
            call=call,
            alpha=alpha,
            starts=starts,
            use_newton=call.newton and not penalty.kappa2_zero,
            newton_from=first_newton_iteration(penalty),
            newton_cost=newton_cost(n, c),
            solver=choose_solver(call.implicit_solver, n, c, penalty.kappa2_zero),
            # with one start the objective only informs (return_info); at a predicted stop it
            # costs a GEMM-sized read of the points
            need_objective=starts > 1 or call.objective,
            every_point=not penalty.is_convex and 1 < n <= EVERY_POINT,
            phi_max=math.inf if penalty.is_convex else _phi_max(penalty, a),
        )


@dataclass
class _Active:
    """The problems still iterated: every (sample, start) pair of the samples ``idx``."""

    idx: Tensor
    pts: CentredPoints
    y: Tensor
    iterations: Tensor
    newton_steps: Tensor
    done: Tensor
    # the last step's 2-norm and ratio, NaN until measured (comparisons with it are False)
    prev_step: Tensor
    prev_rate: Tensor
    # set by each evaluation: the residual, the squared distances at y before the step, and
    # the problems that stopped on a prediction and so have moved since those distances
    residual: Tensor | None = None
    sq: Tensor | None = None
    stale: Tensor | None = None

    @classmethod
    def start(cls, pts: CentredPoints, starts: Tensor, done: Tensor | None) -> _Active:
        """``done`` (B, S): problems frozen from the start, or None."""
        B, S, _ = starts.shape
        nan = torch.full((B, S), math.nan, dtype=starts.dtype, device=starts.device)
        zeros = torch.zeros(B, S, dtype=torch.long, device=starts.device)
        if done is None:
            done = torch.zeros(B, S, dtype=torch.bool, device=starts.device)
        return cls(
            idx=torch.arange(B, device=starts.device),
            pts=pts,
            y=starts,
            iterations=zeros,
            newton_steps=zeros.clone(),
            done=done,
            prev_step=nan,
            prev_rate=nan.clone(),
        )

    def keep(self, keep: Tensor) -> _Active:
        """The samples where ``keep`` (A,) holds."""
        return _Active(
            idx=self.idx[keep],
            pts=self.pts[keep],
            y=self.y[keep],
            iterations=self.iterations[keep],
            newton_steps=self.newton_steps[keep],
            done=self.done[keep],
            prev_step=self.prev_step[keep],
            prev_rate=self.prev_rate[keep],
        )


@dataclass
class _Records:
    """Per (sample, start) of the whole batch, written back whenever the active set shrinks."""

    y: Tensor
    iterations: Tensor
    newton_steps: Tensor
    residual: Tensor
    objective: Tensor
    # where the plan checks every point: the squared distances at each final y, (B, S, n)
    sq: Tensor | None

    @classmethod
    def empty(cls, starts: Tensor, n: int | None) -> _Records:
        """``n``: the number of points where the distances at y are to be kept, else None."""
        B, S, _ = starts.shape
        iterations = torch.zeros(B, S, dtype=torch.long, device=starts.device)
        residual = torch.full((B, S), math.inf, dtype=starts.dtype, device=starts.device)
        objective = torch.full_like(residual, math.nan)
        sq = None if n is None else starts.new_zeros(B, S, n)
        return cls(starts, iterations, torch.zeros_like(iterations), residual, objective, sq)

    def write_back(self, plan: _Plan, run: _Active) -> None:
        if plan.need_objective:
            # the distances were taken at y before this iteration's step, which is where every
            # problem that stopped on a measured residual still is: its objective comes free
            with torch.no_grad():
                sq = run.sq
                if run.stale is not None:
                    sq = torch.where(run.stale[..., None], run.pts.sq_distances(run.y), run.sq)
                self.objective[run.idx] = plan.call.penalty.phi(sq.sqrt(), plan.alpha).sum(-1)
                if self.sq is not None:
                    self.sq[run.idx] = sq
        self.iterations[run.idx] = run.iterations
        self.newton_steps[run.idx] = run.newton_steps
        self.residual[run.idx] = run.residual
        self.y = self.y.index_copy(0, run.idx, run.y)


@dataclass
class _Evaluation:
    """One iteration's look at the active problems, before its step."""

    y_irls: Tensor
    measured: Tensor
    predicted: Tensor | None
    estimate: Tensor | None
    slow: Tensor | None


def _evaluate(plan: _Plan, run: _Active, it: int, sq: Tensor | None = None) -> _Evaluation:
    """The IRLS update, the residual, the predicted stop and the Newton test at iteration it;
    ``sq``: the squared distances at y where they are known already."""
    call = plan.call
    if sq is None:
        sq = run.pts.sq_distances(run.y)
    run.sq, run.stale = sq, None
    y_irls = irls_step(run.pts, run.y, sq, call.penalty, plan.alpha)
    predicted = estimate = slow = None
    with torch.no_grad():
        step, run.residual = step_and_residual(run.pts, run.y, y_irls, plan.alpha)
        measured = run.done | (run.residual <= call.tol)
        # no step ratio at the first iteration: neither the prediction nor the Newton test
        if it > 0:
            rate = step / run.prev_step
            one = it == 1 and call.penalty.is_convex
            estimate = predicted_residual(run.residual, rate, run.prev_rate, one)
            predicted = ~measured & (estimate <= PREDICTED_STOP * call.tol)
            run.prev_rate = rate
            if plan.use_newton and it >= plan.newton_from:
                slow = newton_pays(rate, run.residual, call.tol, plan.newton_cost)
        run.prev_step = step
    return _Evaluation(y_irls, measured, predicted, estimate, slow)


def _newton_where_slow(plan: _Plan, run: _Active, ev: _Evaluation) -> Tensor:
    """The next iterates: a Newton step where one is wanted and taken, else the IRLS step."""
    y_new, take = newton_step(run.pts, run.y, ev.slow, plan.call.penalty, plan.alpha, plan.solver)
    pick = ev.slow.nonzero(as_tuple=True)
    y_next = ev.y_irls.index_put(pick, torch.where(take[:, None], y_new, ev.y_irls[pick]))
    run.newton_steps = run.newton_steps.index_put(pick, run.newton_steps[pick] + take.long())
    # the next step ratio would measure Newton's progress, not the IRLS rate that the
    # predicted stop extrapolates: forget the last step where Newton was taken
    taken = torch.zeros_like(ev.measured).index_put(pick, take)
    run.prev_step = torch.where(taken, math.nan, run.prev_step)
    return y_next


def _advance(plan: _Plan, run: _Active, ev: _Evaluation) -> None:
    """Take the step; freeze the problems that converged, measured or predicted."""
    y_next = ev.y_irls
    if ev.slow is not None and bool(ev.slow.any()):
        y_next = _newton_where_slow(plan, run, ev)
    run.y = torch.where(ev.measured[..., None], run.y, y_next)
    run.iterations += ~ev.measured
    if ev.predicted is None:
        run.done = ev.measured
    else:
        run.residual = torch.where(ev.predicted, ev.estimate, run.residual)
        run.done, run.stale = ev.measured | ev.predicted, ev.predicted


def _iterate(
    plan: _Plan,
    pts: CentredPoints,
    starts: Tensor,
    sq0: Tensor | None = None,
    done: Tensor | None = None,
) -> _Records:
    """Run every (sample, start) problem to convergence or max_iter; ``sq0``: the squared
    distances at the starts, where the caller has them; ``done``: problems not to iterate."""
    records = _Records.empty(starts, pts.x.shape[2] if plan.every_point else None)
    run = _Active.start(pts, starts, done)
    for it in range(plan.call.max_iter + 1):
        ev = _evaluate(plan, run, it, sq0 if it == 0 else None)
        if it == plan.call.max_iter:
            break
        _advance(plan, run, ev)
        if (it + 1) % plan.call.check_every == 0:
            keep = ~run.done.all(-1)
            n_keep = int(keep.sum())
            if n_keep == 0:
                break
            # dropping samples copies the points of the rest: worth it once at most half
            # remain (a frozen sample otherwise costs only its share of the GEMMs)
            if 2 * n_keep <= keep.numel():
                records.write_back(plan, run)
                run = run.keep(keep)
    # the loop always leaves by a break: at max_iter, or with every problem converged
    records.write_back(plan, run)
    return records


_RECORD_FIELDS = ("y", "iterations", "newton_steps", "residual", "objective", "start")


@dataclass
class _Best:
    """Per sample, the record of its start of lowest objective; y centred, (B, C)."""

    y: Tensor
    iterations: Tensor
    newton_steps: Tensor
    residual: Tensor
    objective: Tensor
    start: Tensor
    sq: Tensor | None  # the squared distances at y, (B, n), where every point is checked

    @classmethod
    def of(cls, records: _Records, first: int = 0) -> _Best:
        """Ties go to the earlier start (the mean); ``first``: the index of start 0."""
        best = records.objective.argmin(dim=1)
        rows = torch.arange(best.shape[0], device=best.device)
        sq = None if records.sq is None else records.sq[rows, best]
        return cls(
            y=records.y[rows, best],
            iterations=records.iterations[rows, best],
            newton_steps=records.newton_steps[rows, best],
            residual=records.residual[rows, best],
            objective=records.objective[rows, best],
            start=best + first,
            sq=sq,
        )

    def _with(self, put) -> _Best:
        """A copy with each record ``name`` replaced by ``put(mine, name)``."""
        new = {name: put(getattr(self, name), name) for name in _RECORD_FIELDS}
        return _Best(**new, sq=None)

    def update(self, rows: Tensor, other: _Best) -> _Best:
        """``other``'s records (of the samples ``rows``) where its objective is lower."""
        take = other.objective < self.objective[rows]

        def put(mine: Tensor, name: str) -> Tensor:
            theirs = getattr(other, name)
            pick = take.view(-1, *([1] * (theirs.dim() - 1)))
            return mine.index_copy(0, rows, torch.where(pick, theirs, mine[rows]))

        return self._with(put)

    def update_where(self, where: Tensor, other: _Best) -> _Best:
        """``other``'s records (of the whole batch) where ``where`` (B,) holds and its
        objective is lower."""
        take = where & (other.objective < self.objective)

        def put(mine: Tensor, name: str) -> Tensor:
            pick = take.view(-1, *([1] * (mine.dim() - 1)))
            return torch.where(pick, getattr(other, name), mine)

        return self._with(put)


def _every_point(plan: _Plan, pts: CentredPoints, best: _Best):
    """The objective at every input point but those y sits on (see ``SITS_ON``). Returns which
    samples restart (B,), from which point (B,), and the points, centred (B, n, C), with their
    squared distances (B, n, n)."""
    B, n = pts.sq.shape
    idx = torch.arange(n, device=pts.sq.device).expand(B, n)
    cand, sq, f = _point_objectives(plan, pts, idx)
    with torch.no_grad():
        eps = torch.finfo(f.dtype).eps
        sits = best.sq <= SITS_ON * eps * (pts.sq + best.y.detach().square().sum(-1, True))
        # y's distance to a point it sits on is 0 too, in the objective it is compared with
        phi = plan.call.penalty.phi(best.sq.sqrt(), plan.alpha.detach())
        f_y = best.objective - phi.masked_fill(~sits, 0).sum(-1)
        f_min, j = f.masked_fill(sits, math.inf).min(-1)
        restart = f_min < f_y * (1 - MARGIN * eps)
    return restart, j, cand, sq


def _check_every_point(plan: _Plan, pts: CentredPoints, best: _Best) -> _Best:
    """Where an input point scores lower than y (small problems: :data:`EVERY_POINT`), solve
    again from the lowest (one start, its distances known) and keep the result where it ends
    lower, which it does (IRLS never rises)."""
    restart, j, cand, sq = _every_point(plan, pts, best)
    if not bool(restart.any()):
        return best
    b = torch.arange(j.shape[0], device=j.device)
    start, sq0 = cand[b, j][:, None, :], sq[b, j][:, None, :]
    sub = replace(plan, starts=1, need_objective=True, every_point=False)
    rows = restart.nonzero()[:, 0]
    if 2 * rows.numel() <= restart.numel():
        # a few samples: their points copied, as the solve's own drop of converged ones does
        records = _iterate(sub, pts[rows], start[rows], sq0[rows])
        return best.update(rows, _Best.of(records, first=plan.starts))
    # most of the batch: all of it, the others frozen from the start
    records = _iterate(sub, pts, start, sq0, ~restart[:, None])
    return best.update_where(restart, _Best.of(records, first=plan.starts))


def _point_objectives(plan: _Plan, pts: CentredPoints, idx: Tensor) -> tuple[Tensor, ...]:
    """The input points ``idx`` (B, k), centred (B, k, C), their squared distances to every
    point (B, k, n) and their objectives (B, k), each point's distance to itself taken as 0
    rather than the identity's rounding of it."""
    b = torch.arange(idx.shape[0], device=idx.device)[:, None]
    cand = pts.x.mT[b, idx] + pts.neg_mean
    sq = pts.sq_distances(cand)
    with torch.no_grad():
        own = torch.zeros_like(sq, dtype=torch.bool).scatter_(2, idx[:, :, None], True)
        z = sq.detach().masked_fill(own, 0.0).sqrt()
        f = plan.call.penalty.phi(z, plan.alpha.detach()).sum(-1)
    return cand, sq, f


def _leave_bad_starts(
    plan: _Plan, pts: CentredPoints, starts: Tensor, sq: Tensor
) -> tuple[Tensor, Tensor]:
    """Starts (B, S, C) with distances sq (B, S, n) whose objective exceeds (n - 1) phi_max,
    worse than every input point (phi(0) = 0, and phi_max bounds the other terms), moved to
    an input point: of the :data:`CANDIDATES` nearest the first start (the mean, which dense
    groups of points pull towards them), the one of lowest objective (for truncated quadratic,
    about the one with the most neighbours within alpha; ties to the nearest). Such a start
    may be flat, where IRLS does not move at all (truncated quadratic, every point beyond
    alpha: no weight); and since IRLS never rises, no other start can end there."""
    n = sq.shape[-1]
    with torch.no_grad():
        f = plan.call.penalty.phi(sq.detach().sqrt(), plan.alpha.detach()).sum(-1)
        bad = f > (n - 1) * plan.phi_max * (1 + MARGIN * torch.finfo(f.dtype).eps)
        if not bool(bad.any()):
            return starts, sq
        idx = sq[:, 0].detach().topk(min(n, CANDIDATES), largest=False).indices
    cand, sq_c, f_c = _point_objectives(plan, pts, idx)
    # argmin returns the first of equal values: the nearest of tied points
    b, j = torch.arange(idx.shape[0], device=idx.device), f_c.argmin(-1)
    pick, point, sq_point = bad[..., None], cand[b, j][:, None], sq_c[b, j][:, None]
    return torch.where(pick, point, starts), torch.where(pick, sq_point, sq)


def _solved(call: PoolCall, best: _Best, x: Tensor, mean: Tensor, alpha: Tensor) -> Solved:
    """The solution and its record; a warning where a sample did not converge."""
    converged = best.residual <= call.tol
    if not bool(converged.all()):
        _warn_not_converged(call, converged, best.residual)
    y = best.y + mean
    extra = {"start": best.start, "objective": best.objective, "newton_steps": best.newton_steps}
    info = SolverInfo(best.iterations, best.residual, converged, extra)
    return Solved(y, (x, y, alpha), info)


def _warn_not_converged(call: PoolCall, converged: Tensor, residual: Tensor) -> None:
    bad = int((~converged).sum())
    warnings.warn(
        f"robust_pool ({call.penalty.name}): {bad} of {converged.numel()} samples did not "
        f"converge in max_iter={call.max_iter} iterations (largest residual "
        f"{float(residual.max()):.3g} > tol={call.tol:g}); raise max_iter or tol",
        ConvergenceWarning,
        stacklevel=5,
    )


def _mean_solution(call: PoolCall, x: Tensor, mean: Tensor, alpha: Tensor) -> Solved:
    """The closed form (quadratic penalty): the mean, with no iteration."""
    B = x.shape[0]
    zeros = torch.zeros(B, dtype=torch.long, device=x.device)
    with torch.no_grad():
        # sum_i ||x_i - m||^2 / 2 from the centred offsets, which x.var along the points
        # computes far more slowly; only return_info shows it, and it costs more than the mean
        if call.objective:
            f = 0.5 * centred_sq_norms(x, mean).sum(-1)
        else:
            f = torch.full((B,), math.nan, dtype=x.dtype, device=x.device)
    ones = torch.ones(B, dtype=torch.bool, device=x.device)
    extra = {"start": zeros, "objective": f, "newton_steps": zeros}
    return Solved(mean, (x, mean, alpha), SolverInfo(zeros, torch.zeros_like(f), ones, extra))


def _mean(x: Tensor) -> Tensor:
    """The mean of the points (B, C); ValueError naming x if it holds NaN or inf. A mean that is
    not finite while x is (its sum overflowed: points near the dtype's largest number) is
    taken again from x / n, whose sum cannot overflow."""
    mean = x.mean(-1)
    if not math.isfinite(float(mean.detach().sum())):
        check_tensor(x, "x")
        mean = (x / x.shape[-1]).sum(-1)
    return mean


def solve(call: PoolCall, x: Tensor, alpha: Tensor) -> Solved:
    """Minimise for every sample of x (B, C, n) at the 0-d alpha; differentiable iff autograd
    is enabled (``unroll``: autograd then follows every step of the winning start).

    ``Solved.saved`` is (x, y, alpha), what the backward modes need; the record's extras are
    ``start`` (0 mean, 1 median, 2 + k the k-th restart), ``objective`` (NaN for a single
    start unless ``call.objective``) and ``newton_steps``.
    """
    mean = _mean(x)
    if call.penalty.closed_form:
        return _mean_solution(call, x, mean, alpha)
    pts = CentredPoints.of(x, mean)
    # one host sync for both numbers
    max_sq, a = torch.stack([pts.sq.detach().amax(), alpha.detach()]).tolist()
    check_range(max_sq, a, x.dtype)
    starts = initial_points(x, mean, call.penalty, call.restarts) - mean[:, None, :]
    B, C, n = x.shape
    plan = _Plan.of(call, alpha, n, C, starts.shape[1], a)
    if call.penalty.is_convex:
        # the one start is the mean, yc = 0: its distances are the centred ones
        best = _Best.of(_iterate(plan, pts, starts, pts.sq3))
    else:
        starts, sq = _leave_bad_starts(plan, pts, starts, pts.sq_distances(starts))
        best = _Best.of(_iterate(plan, pts, starts, sq))
        if plan.every_point:
            best = _check_every_point(plan, pts, best)
    return _solved(call, best, x, mean, alpha)
