"""Robust pooling benchmark: the paper's Fig. 1 on this machine, and the targets of issue 3.

    python scripts/bench_pool.py                          # writes docs/benchmarks/pool/
    python scripts/bench_pool.py --quick --out /tmp/pool  # a smoke run in seconds

Cases: C=128 channels on s x s maps, s in {4, 8, 16, 32, 64}, batch 1 (Fig. 1), and the
ResNet case C=512, 7x7, batch 32; two kinds of input: ``randn`` (the paper's) and
``feature`` (a per-sample centre, inliers within about alpha of it, 10% outliers ~10 alpha
away: with randn in 128 dimensions every point is ~11 alpha from any centre, so the
non-convex penalties are degenerate there). For each penalty and backward mode: forward and
backward time (median of repeats; on a CPU the CPU time of the benchmark thread with torch on
one thread, see ``--clock``) and peak memory (benchutil: profiler records on CPU), and a
torch.optim.LBFGS forward with the paper's settings as the baseline, all float32. In the
cases of the forward target the forward is also timed against L-BFGS round by round, and the
target reads that paired ratio.

Outputs: ``pool.csv`` (+ ``pool.meta.json``: machine, threads, command), ``targets.md``
(each target of issue 3, measured side by side in this run); ``plot_pool.py`` draws the PNGs.
"""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from benchutil import (
    MIB,
    machine_info,
    paired_ratio,
    peak_memory_bytes,
    time_within,
    use_clock,
    write_csv,
)

import ddn_layers as ddn
from ddn_layers.pooling.median import coordinate_median

KINDS = ("randn", "feature")
MODES = tuple(ddn.BackwardMode.choices())
# the implicit mode with each Hessian route forced, beside "auto"
VARIANTS = [("implicit", "auto"), ("implicit", "cholesky"), ("implicit", "woodbury")] + [
    (m, "auto") for m in MODES[1:]
]
RESNET = (32, 512, 7)  # batch, channels, map side
# the cases of the forward-time target: there the forward is also timed against L-BFGS
# back to back, round by round (benchutil.paired_ratio)
FWD_TARGET_CASES = (RESNET, (1, 128, 64))


def make_input(kind: str, B: int, C: int, s: int, alpha: float, seed: int) -> torch.Tensor:
    """(B, C, s, s) float32 points: ``randn`` or ``feature`` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        return torch.randn(B, C, s, s, generator=g)
    n = s * s
    centre = 2.0 * torch.randn(B, C, 1, generator=g)
    x = centre + 0.5 * alpha * torch.randn(B, C, n, generator=g) / math.sqrt(C)
    far = torch.rand(B, 1, n, generator=g) < 0.1
    x = torch.where(far, centre + 10 * alpha * torch.randn(B, C, n, generator=g) / C**0.5, x)
    return x.reshape(B, C, s, s)


def lbfgs_pool(x: torch.Tensor, penalty: str, alpha: float, evals: list | None = None):
    """The paper's forward: torch.optim.LBFGS on the batch-summed objective (lr 1, up to 100
    iterations, history 5, no line search, tolerance_grad 1e-5, tolerance_change 1e-9); the
    mean for quadratic; non-convex penalties keep the better of the mean and median starts.
    ``evals``, if given, receives the number of objective evaluations of each start."""
    p = ddn.PENALTIES[penalty]
    x = x.flatten(2)
    if p.closed_form:
        return x.mean(-1)
    a = torch.tensor(alpha, dtype=x.dtype, device=x.device)
    starts = [x.mean(-1)] + ([] if p.is_convex else [x.median(-1).values])
    best_y, best_f = None, None
    for y0 in starts:
        y = y0.clone().requires_grad_()
        opt = torch.optim.LBFGS(
            [y], lr=1.0, max_iter=100, max_eval=None, tolerance_grad=1e-5,
            tolerance_change=1e-9, history_size=5, line_search_fn=None,
        )  # fmt: skip

        count = [0]

        def closure(y=y, opt=opt, count=count):
            count[0] += 1
            opt.zero_grad()
            f = p.phi(torch.linalg.vector_norm(y[:, :, None] - x, dim=1), a).sum()
            f.backward()
            return f

        with torch.enable_grad():
            opt.step(closure)
        if evals is not None:
            evals.append(count[0])
        y = y.detach()
        f = p.phi(torch.linalg.vector_norm(y[:, :, None] - x, dim=1), a).sum(-1)
        if best_y is None:
            best_y, best_f = y, f
        else:
            better = f < best_f
            best_y = torch.where(better[:, None], y, best_y)
            best_f = torch.where(better, f, best_f)
    return best_y


def objective64(x: torch.Tensor, y: torch.Tensor, penalty: str, alpha: float) -> torch.Tensor:
    """Per-sample objective evaluated in float64, so that float32 rounding of the sum does
    not decide which solver is ahead."""
    x, y = x.flatten(2).double(), y.double()
    z = torch.linalg.vector_norm(y[:, :, None] - x, dim=1)
    return ddn.PENALTIES[penalty].phi(z, torch.tensor(alpha, dtype=torch.float64)).sum(-1)


class _Counter:
    """Runs a callable, counting IllConditionedWarning and checking outputs are finite."""

    def __init__(self) -> None:
        self.ill = 0
        self.finite = True

    def __call__(self, fn: Callable[[], object]) -> object:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn()
        self.ill += sum(issubclass(w.category, ddn.IllConditionedWarning) for w in caught)
        for t in out if isinstance(out, tuple) else (out,):
            self.finite &= bool(torch.isfinite(t).all())
        return out


def bench_variant(x, penalty, alpha, mode, solver, budget, pair_lbfgs=False) -> dict:
    """Forward and backward time and peak memory of one mode, on one input; with
    ``pair_lbfgs``, also the forward's time over L-BFGS's, paired round by round."""
    kw = {"backward_mode": mode, "implicit_solver": solver}
    dev = x.device
    xg = x.clone().requires_grad_()
    v = torch.randn(x.shape[:2], generator=torch.Generator().manual_seed(1)).to(dev)
    check = _Counter()

    def forward():
        return ddn.robust_pool(xg, penalty, alpha, **kw)

    def backward(y):
        return torch.autograd.grad(y, xg, v)[0]

    y, info = ddn.robust_pool(xg, penalty, alpha, return_info=True, **kw)
    check(lambda: (y.detach(), backward(y)))
    t_fwd = time_within(forward, budget_s=budget, device=dev)
    t_bwd = time_within(backward, budget_s=budget, setup=forward, device=dev)
    fwd_peak = peak_memory_bytes(forward, dev)
    y = forward()
    bwd_peak = peak_memory_bytes(lambda: backward(y), dev)
    paired = {}
    if pair_lbfgs:
        lbfgs = lambda: lbfgs_pool(x, penalty, alpha)  # noqa: E731
        paired["fwd_over_lbfgs_paired"] = paired_ratio(forward, lbfgs, rounds=11, device=dev)[0]
    return paired | {
        "mode": mode,
        "solver": solver,
        "fwd_ms": 1e3 * t_fwd.median,
        "bwd_ms": 1e3 * t_bwd.median,
        "fwd_peak_mib": fwd_peak / MIB,
        "bwd_peak_mib": bwd_peak / MIB,
        "fwd_repeats": len(t_fwd.times),
        "bwd_repeats": len(t_bwd.times),
        "iters_mean": float(info.iterations.float().mean()),
        "newton_steps_mean": float(info.extra["newton_steps"].float().mean()),
        "objective": float(objective64(x, y.detach(), penalty, alpha).mean()),
        "finite": check.finite,
        "ill_conditioned_warnings": check.ill,
    }


def bench_lbfgs(x, penalty, alpha, budget) -> dict:
    dev = x.device
    t = time_within(lambda: lbfgs_pool(x, penalty, alpha), budget_s=budget, device=dev)
    evals = []
    y = lbfgs_pool(x, penalty, alpha, evals)
    # both solvers start non-convex penalties from the coordinate-wise median, L-BFGS (the
    # paper's code) with torch.median, ours with ddn_layers' own (a selection network for many
    # short rows, counting for long ones, where faster): both costs are reported, so that the
    # solvers can also be compared without them
    median_ms = ours_median_ms = 0.0
    if not ddn.PENALTIES[penalty].is_convex:
        flat = x.flatten(2)
        median_ms = 1e3 * time_within(lambda: flat.median(-1), budget_s=budget, device=dev).median
        ours_median_ms = (
            1e3 * time_within(lambda: coordinate_median(flat), budget_s=budget, device=dev).median
        )
    return {
        "mode": "lbfgs",
        "solver": "torch.optim.LBFGS",
        "fwd_ms": 1e3 * t.median,
        "median_start_ms": median_ms,
        "ours_median_start_ms": ours_median_ms,
        "lbfgs_evals": "+".join(map(str, evals)),  # per start: mean(+median)
        "fwd_peak_mib": peak_memory_bytes(lambda: lbfgs_pool(x, penalty, alpha), dev) / MIB,
        "fwd_repeats": len(t.times),
        "objective": float(objective64(x, y, penalty, alpha).mean()),
        "finite": bool(torch.isfinite(y).all()),
    }


def run(args) -> list[dict]:
    cases = [(args.batch, 128, s) for s in args.sizes]
    if not args.skip_resnet:
        cases.append(RESNET)
    rows = []
    for kind in args.kinds:
        for B, C, s in cases:
            x = make_input(kind, B, C, s, args.alpha, seed=s).to(args.device)
            for penalty in args.penalties:
                base = {"kind": kind, "penalty": penalty, "B": B, "C": C, "s": s, "n": s * s}
                rows.append(base | bench_lbfgs(x, penalty, args.alpha, args.budget))
                pair = (B, C, s) in FWD_TARGET_CASES and not ddn.PENALTIES[penalty].closed_form
                for mode, solver in VARIANTS:
                    if mode in args.modes:
                        first = pair and (mode, solver) == ("implicit", "auto")
                        r = bench_variant(x, penalty, args.alpha, mode, solver, args.budget, first)
                        rows.append(base | r)
                        print(
                            f"{kind:7s} B={B:2d} C={C:3d} s={s:2d} {penalty:19s} "
                            f"{mode:8s} {solver:8s} fwd {r['fwd_ms']:9.2f} ms "
                            f"bwd {r['bwd_ms']:9.2f} ms  bwd peak {r['bwd_peak_mib']:8.2f} MiB",
                            flush=True,
                        )
    return rows


def _get(rows, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def targets(rows: list[dict]) -> list[dict]:
    """Issue 3's targets, each as measured in this run (None where a case was skipped)."""
    out = []

    def add(name, case, value, limit, ok):
        out.append({"target": name, "case": case, "value": value, "limit": limit, "ok": ok})

    B, C, s = RESNET
    for kind in KINDS:
        for pen in ("pseudo-huber", "welsch"):
            key = {"kind": kind, "penalty": pen, "B": B, "C": C, "s": s}
            imp = _get(rows, mode="implicit", solver="auto", **key)
            chol = _get(rows, mode="implicit", solver="cholesky", **key)
            full = _get(rows, mode="full", **key)
            case = f"ResNet {kind} {pen}"
            if imp and chol:
                r = imp["bwd_ms"] / chol["bwd_ms"]
                add("implicit bwd time / channel-space Cholesky", case, r, 1 / 10, r <= 1 / 10)
            if imp and full:
                r = imp["bwd_ms"] / full["bwd_ms"]
                add("implicit bwd time / full", case, r, 1 / 20, r <= 1 / 20)
    for kind in KINDS:
        for pen in ddn.PENALTIES:
            key = {"kind": kind, "penalty": pen, "B": 1, "C": 128, "s": 64}
            imp = _get(rows, mode="implicit", solver="auto", **key)
            full = _get(rows, mode="full", **key)
            if imp and full:
                r = imp["bwd_peak_mib"] / full["bwd_peak_mib"]
                add("implicit bwd peak / full", f"C=128 s=64 {kind} {pen}", r, 1 / 50, r <= 1 / 50)
    for B, C, s in (RESNET, (1, 128, 64)):
        for kind in KINDS:
            for pen in ddn.PENALTIES:
                if ddn.PENALTIES[pen].closed_form:
                    continue  # the mean in both
                key = {"kind": kind, "penalty": pen, "B": B, "C": C, "s": s}
                ours = _get(rows, mode="implicit", solver="auto", **key)
                lb = _get(rows, mode="lbfgs", **key)
                if not (ours and lb):
                    continue
                r = ours.get("fwd_over_lbfgs_paired") or ours["fwd_ms"] / lb["fwd_ms"]
                rel = (ours["objective"] - lb["objective"]) / abs(lb["objective"])
                case = f"B={B} C={C} s={s} {kind} {pen}"
                add("forward time / L-BFGS", case, r, 1 / 5, r <= 1 / 5)
                if lb["median_start_ms"] > 0:
                    mine, theirs = lb["ours_median_start_ms"], lb["median_start_ms"]
                    r = max(ours["fwd_ms"] - mine, 0.0) / max(lb["fwd_ms"] - theirs, 1e-9)
                    add("  the same, both median starts excluded", case, r, 1 / 5, r <= 1 / 5)
                add("objective - L-BFGS's (relative)", case, rel, 1e-6, rel <= 1e-6)
    bad = [r for r in rows if not r.get("finite", True)]
    add("non-finite y or gradient", "all rows", len(bad), 0, not bad)
    return out


def write_targets(path: Path, results: list[dict], meta: dict) -> None:
    lines = [
        "# Robust pooling: the targets of issue 3, measured in one run",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['cpu']}, {meta['torch_threads']} torch threads, torch {meta['torch']}"
        f", {meta['date_utc']}",
        "",
        "| target | case | measured | limit | met |",
        "|---|---|---|---|---|",
    ]
    for t in results:
        v = t["value"]
        shown = f"{v:.3g}" if isinstance(v, float) else str(v)
        lim = t["limit"]
        lim = f"{lim:.3g}" if isinstance(lim, float) else str(lim)
        lines.append(
            f"| {t['target']} | {t['case']} | {shown} | {lim} | {'yes' if t['ok'] else 'NO'} |"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/pool"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--penalties", nargs="+", default=list(ddn.PENALTIES))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--budget", type=float, default=1.5, help="seconds of repeats per timing")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--batch", type=int, default=1, help="batch of the C=128 s x s cases")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, no ResNet case")
    ap.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default=None,
        help="cpu: CPU time of the benchmark thread, torch on one thread (default on CPU: "
        "time spent waiting for a CPU (other processes, steal) does not count); wall: "
        "perf_counter",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.skip_resnet, args.budget = [4, 8], True, 0.05
    clock = args.clock or ("cpu" if torch.device(args.device).type == "cpu" else "wall")
    if clock == "cpu" and (torch.device(args.device).type != "cpu" or (args.threads or 1) > 1):
        ap.error("--clock cpu times one CPU thread: use it on --device cpu without --threads")
    use_clock(clock)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = machine_info(args.device)
    rows = run(args)
    write_csv(args.out / "pool.csv", rows, meta)
    results = targets(rows)
    write_targets(args.out / "targets.md", results, meta)
    for t in results:
        print(f"{'ok ' if t['ok'] else 'NOT'} {t['target']:40s} {t['case']:40s} {t['value']:.4g}")


if __name__ == "__main__":
    main()
