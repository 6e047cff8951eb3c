"""How far the pooling solver's predicted stop can be trusted, on random problems.

    python scripts/check_pool_prediction.py                    # 3000 problems, float32
    python scripts/check_pool_prediction.py --dtype float64 --problems 1500

The solver stops a problem one evaluation early when the residual it is about to reach,
predicted as (this residual) x (the larger of its last two contraction ratios), is below
``PREDICTED_STOP * tol`` (solver.py). This script runs the solver's iteration, composed of the
solver's own public steps (IRLS step, residual, prediction, Newton test and step), with that
stop left out and no sample dropped, and pairs every prediction with the residual measured
one iteration later. For a few thresholds it prints how many predictions
fell below them and the largest measured residual among those, in units of tol: a threshold
is safe when that stays below 1.

Problems: C in {1 ... 2048}, n in {1 ... 1024}, batch 1-16, every non-quadratic penalty,
alpha in 0.01 ... 30, points as randn at random scales, offset from the origin, duplicated,
on a 2-d subspace, or feature-like (bench_pool.make_input); 0 or 2 restarts.
"""

from __future__ import annotations

import argparse
import math
import random
import warnings

import torch
from bench_pool import make_input

from ddn_layers.pooling.hessian import choose_solver
from ddn_layers.pooling.options import DEFAULT_TOL, PoolOptions
from ddn_layers.pooling.penalties import PENALTIES
from ddn_layers.pooling.points import CentredPoints
from ddn_layers.pooling.solver import (
    PREDICTED_STOP,
    first_newton_iteration,
    initial_points,
    irls_step,
    newton_cost,
    newton_pays,
    newton_step,
    predicted_residual,
    step_and_residual,
)

KINDS = ("randn", "offset", "duplicated", "subspace", "feature")
THRESHOLDS = (0.1, PREDICTED_STOP, 0.5, 1.0)


def random_problem(rng: random.Random, seed: int, dtype: torch.dtype):
    C = rng.choice([1, 2, 3, 8, 32, 128, 512, 2048])
    n = rng.choice([1, 2, 5, 16, 49, 200, 1024])
    B = rng.choice([1, 4, 16])
    alpha = 10 ** rng.uniform(-2, 1.5)
    kind = rng.choice(KINDS)
    g = torch.Generator().manual_seed(seed)
    if kind == "feature" and n >= 4 and math.isqrt(n) ** 2 == n:
        x = make_input("feature", B, C, math.isqrt(n), alpha, seed).flatten(2)
    elif kind == "subspace":
        x = torch.randn(B, C, 2, generator=g) @ torch.randn(B, 2, n, generator=g)
    else:
        x = torch.randn(B, C, n, generator=g) * 10 ** rng.uniform(-2, 1.5)
        if kind == "offset":
            x = x + 10 ** rng.uniform(-1, 2) * torch.randn(B, C, 1, generator=g)
        elif kind == "duplicated":
            x = x[..., torch.randint(0, max(1, n // 3), (n,), generator=g)]
    penalty = rng.choice([p for p in PENALTIES.values() if not p.closed_form])
    return x.to(dtype), torch.tensor(alpha, dtype=dtype), penalty, rng.choice([0, 0, 2])


@torch.no_grad()
def pairs_of(x, alpha, penalty, restarts, tol) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, residual measured one iteration later), for every problem and iteration
    where the solver made a prediction and had not yet converged.

    The solver's iteration with robust_pool's defaults (``PoolOptions.defaults()``), but no
    stop on a prediction and no dropped samples, so that every problem is followed to its
    measured convergence.
    """
    defaults = PoolOptions.defaults()
    n, C = x.shape[2], x.shape[1]
    mean = x.mean(-1)
    pts = CentredPoints.of(x, mean)
    y = initial_points(x, mean, penalty, restarts) - mean[:, None, :]
    use_newton = defaults["newton"] and not penalty.kappa2_zero
    solver = choose_solver(defaults["implicit_solver"], n, C, penalty.kappa2_zero)
    cost, newton_from = newton_cost(n, C), first_newton_iteration(penalty)
    done = torch.zeros(y.shape[:2], dtype=torch.bool)
    prev_step = torch.full(y.shape[:2], math.nan, dtype=x.dtype)
    prev_rate = prev_step
    preds, actual, last = [], [], None
    for it in range(defaults["max_iter"] + 1):
        y_irls = irls_step(pts, y, pts.sq_distances(y), penalty, alpha)
        step, residual = step_and_residual(pts, y, y_irls, alpha)
        measured = done | (residual <= tol)
        if last is not None:
            est, live = last
            live = live & ~est.isnan()  # no prediction across a Newton step (solver.py)
            preds.append(est[live])
            actual.append(residual[live])
        last = None
        if it > 0:
            rate = step / prev_step
            one = it == 1 and penalty.is_convex
            last = (predicted_residual(residual, rate, prev_rate, one), ~measured)
            prev_rate = rate
        prev_step = step
        if it == defaults["max_iter"] or bool(measured.all()):
            break
        y_next = y_irls
        if use_newton and it >= newton_from:
            slow = newton_pays(rate, residual, tol, cost)
            if bool(slow.any()):
                y_new, take = newton_step(pts, y, slow, penalty, alpha, solver)
                pick = slow.nonzero(as_tuple=True)
                y_next = y_next.index_put(pick, torch.where(take[:, None], y_new, y_irls[pick]))
                taken = torch.zeros_like(measured).index_put(pick, take)
                prev_step = torch.where(taken, math.nan, prev_step)
        y = torch.where(measured[..., None], y, y_next)
        done = measured
    if not preds:
        return torch.zeros(0, dtype=x.dtype), torch.zeros(0, dtype=x.dtype)
    return torch.cat(preds), torch.cat(actual)


def main(argv=None) -> dict[float, tuple[int, float]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=3000)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    tol = DEFAULT_TOL[dtype]
    rng = random.Random(args.seed)
    preds, actual = [], []
    with warnings.catch_warnings():
        # problems that run to max_iter still give their pairs
        warnings.simplefilter("ignore")
        for k in range(args.problems):
            p, a = pairs_of(*random_problem(rng, args.seed * 100003 + k, dtype), tol)
            preds.append(p)
            actual.append(a)
    p, a = torch.cat(preds), torch.cat(actual)
    print(f"{args.problems} problems ({args.dtype}, tol {tol:g}): {p.numel()} predictions")
    out = {}
    for t in THRESHOLDS:
        below = p <= t * tol
        worst = float(a[below].max()) / tol if below.any() else 0.0
        over = int((a[below] > tol).sum())
        out[t] = (int(below.sum()), worst)
        mark = "  <- the solver's" if t == PREDICTED_STOP else ""
        print(
            f"predicted <= {t:g} tol: {int(below.sum()):6d}, then measured above tol: {over:3d}, "
            f"largest measured {worst:.3g} tol{mark}"
        )
    return out


if __name__ == "__main__":
    main()
