"""How far the pooling solver's predicted stop can be trusted, on random problems.

    python scripts/check_pool_prediction.py                    # 3000 problems, float32
    python scripts/check_pool_prediction.py --dtype float64 --problems 1500

The solver stops a problem one evaluation early when the residual it is about to reach,
predicted as (this residual) x (the larger of its last two contraction ratios), is below
``PREDICTED_STOP * tol`` (solver.py). This script runs the solver with that stop turned off
(``predict_below=0``) and, through its ``trace`` hook, pairs every prediction with the
residual measured one iteration later. For a few thresholds it prints how many predictions
fell below them and the largest measured residual among those, in units of tol: a threshold
is safe when that stays below 1.

Problems: C in {1 ... 2048}, n in {1 ... 1024}, batch 1-16, every non-quadratic penalty,
alpha in 0.01 ... 30, points as randn at random scales, offset from the origin, duplicated,
on a 2-d subspace, or feature-like (bench_pool.make_input); 0 or 2 restarts.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import warnings

import torch
from bench_pool import make_input

from ddn_layers.pooling.module import _OPTION_DEFAULTS
from ddn_layers.pooling.options import DEFAULT_TOL, solve_options
from ddn_layers.pooling.penalties import PENALTIES
from ddn_layers.pooling.solver import PREDICTED_STOP, solve

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


def pairs_of(x, alpha, penalty, restarts, tol) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, residual measured one iteration later), for every problem and iteration
    where the solver made a prediction and had not yet converged."""
    # robust_pool's defaults, but no stop on a prediction and no dropped samples (the trace's
    # rows stay aligned)
    opts = solve_options(
        dtype=x.dtype, device=x.device, **_OPTION_DEFAULTS | {"tol": tol, "restarts": restarts}
    )
    opts = dataclasses.replace(opts, check_every=opts.max_iter + 1, predict_below=0.0)
    preds, actual, last = [], [], [None]

    def trace(it, residual, estimate, measured):
        if last[0] is not None:
            est, live = last[0]
            live = live & ~est.isnan()  # no prediction across a Newton step (solver.py)
            preds.append(est[live])
            actual.append(residual[live])
        last[0] = None if estimate is None else (estimate.clone(), ~measured)

    with torch.no_grad():
        solve(x, alpha, penalty, opts, trace=trace)
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
