"""Generic declarative nodes against the structured layers: what exploiting structure buys.

    python scripts/bench_generic.py                            # writes docs/benchmarks/generic/
    python scripts/bench_generic.py --quick --out /tmp/generic # a smoke run in seconds
    python scripts/bench_generic.py --out /tmp/generic --cases "C=512" --methods implicit
                                                # a targeted run: some cases, some methods

The paper's sizes, float64 on the CPU (the generic node is the reference that specialised code
is checked against, so it is run at the precision of such a check):

* robust pooling, pseudo-Huber, alpha = 1, x = randn: C=512 on 7x7 maps at batch 32 (a ResNet's
  last feature map), and C=128 on 64x64 at batch 1 (the largest map of the paper's Fig. 1);
* entropic optimal transport, gamma = 10, M = randn, uniform marginals, batch 1: 100x100 and
  500x500 (the paper's Fig. 3).

Methods: the built-in layers (``ddn.robust_pool``, ``ddn.sinkhorn``) in their ``implicit`` and
``full`` modes, and the same problems written as a ``ddn.DeclarativeNode`` (objective and
constraints only) in its ``implicit`` and ``full`` modes. For optimal transport the generic
``implicit`` is run twice: with the entropy's diagonal Hessian given as ``hessian_approx``
(which preconditions CG: the "hybrid" of the paper's Discussion) and without it (pure
autodiff). Generic ``full`` is skipped where its dense matrices would not fit in
``--dense-budget-gib``.

Each row: forward and backward wall time (median of the repeats that fit the time budget),
peak memory of forward and of backward (benchutil: profiler allocation records), and the
relative difference (2-norm) of the input gradient from the built-in ``implicit`` one.
Outputs: ``generic.csv`` (+ ``.meta.json``), ``targets.md``, ``generic.png``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from benchutil import MIB, machine_info, peak_memory_bytes, read_csv, time_within, write_csv

import ddn_layers as ddn

F64 = torch.float64
GAMMA = 10.0
SINKHORN = {"tol": 1e-10, "max_iter": 100_000}
POOL_TOL = 1e-12  # both forwards to the rounding floor, so gradients compare at ~1e-10


def pool_objective(x, alpha, y):
    a = alpha.unsqueeze(-1)
    z2 = ((y.unsqueeze(-1) - x) ** 2).sum(1)
    return (a**2 * (torch.sqrt(1 + z2 / a**2) - 1)).sum(-1)


def ot_objective(M, r, c, P):
    return (P * M).sum((1, 2)) + (P * (P.log() - 1)).sum((1, 2)) / GAMMA


def ot_constraints(M, r, c, P):
    # the first row-sum constraint is implied by the others (paper, Eq. 16)
    return torch.cat([P.sum(2)[:, 1:] - r[:, 1:], P.sum(1) - c], -1)


def ot_solve(M, r, c):
    return ddn.sinkhorn(M, r, c, gamma=GAMMA, **SINKHORN)


def ot_hessian(M, r, c, P):
    return 1.0 / (GAMMA * P)


def pool_case(B, C, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, s * s, generator=g, dtype=F64)
    v = torch.randn(B, C, generator=g, dtype=F64)
    alpha = torch.ones(B, dtype=F64)
    generic = {
        "generic implicit": ddn.DeclarativeNode(
            pool_objective, init=lambda x, a: x.mean(-1), tol=POOL_TOL
        ),
        "generic full": ddn.DeclarativeNode(
            pool_objective, init=lambda x, a: x.mean(-1), tol=POOL_TOL, backward_mode="full"
        ),
    }
    methods = {
        "structured implicit": lambda x: ddn.robust_pool(x, "pseudo-huber", 1.0, tol=POOL_TOL),
        "structured full": lambda x: ddn.robust_pool(
            x, "pseudo-huber", 1.0, tol=POOL_TOL, backward_mode="full"
        ),
    }
    methods.update({k: (lambda x, node=node: node(x, alpha)) for k, node in generic.items()})
    # dense H (m x m) and B (m x n) per sample
    dense_bytes = 8 * B * (C * C + C * C * s * s)
    return {"x": x, "v": v, "methods": methods, "dense_bytes": dense_bytes}


def ot_case(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(1, m, m, generator=g, dtype=F64)
    V = torch.randn(1, m, m, generator=g, dtype=F64)
    r = torch.full((1, m), 1.0 / m, dtype=F64)
    node = {
        "generic implicit (diag. precond.)": ddn.DeclarativeNode(
            ot_objective, ot_constraints, solver=ot_solve, hessian_approx=ot_hessian
        ),
        "generic implicit (no precond.)": ddn.DeclarativeNode(
            ot_objective, ot_constraints, solver=ot_solve
        ),
        "generic full": ddn.DeclarativeNode(
            ot_objective, ot_constraints, solver=ot_solve, backward_mode="full"
        ),
    }
    methods = {
        "structured implicit": lambda M: ddn.sinkhorn(M, gamma=GAMMA, **SINKHORN),
        "structured full": lambda M: ddn.sinkhorn(M, gamma=GAMMA, backward_mode="full", **SINKHORN),
    }
    methods.update({k: (lambda M, n=n: n(M, r, r)) for k, n in node.items()})
    mm, p = m * m, 2 * m - 1
    dense_bytes = 8 * (2 * mm * mm + 2 * p * mm)  # H and B (M -> P), A and C
    return {"x": M, "v": V, "methods": methods, "dense_bytes": dense_bytes}


def _run(fn: Callable[[], object]) -> tuple[object, dict[str, int]]:
    """fn() with its warnings counted by kind (they are part of the result, not noise)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    counts: dict[str, int] = {}
    for w in caught:
        name = w.category.__name__
        counts[name] = counts.get(name, 0) + 1
    return out, counts


def _timed(fn: Callable[[], object]) -> tuple[object, float, dict[str, int]]:
    t0 = time.perf_counter()
    out, warned = _run(fn)
    return out, time.perf_counter() - t0, warned


def bench_method(name, method, case, budget) -> tuple[dict, torch.Tensor]:
    x, v = case["x"], case["v"]
    xg = x.clone().requires_grad_()

    def forward():
        return method(xg)

    def backward(y):
        return torch.autograd.grad(y, xg, v)[0]

    # the first call is timed too: a method that takes longer than the budget (the dense
    # baselines, a CG that runs to its limit) is measured once rather than three times
    y, t_fwd, w_fwd = _timed(forward)
    grad, t_bwd, w_bwd = _timed(lambda: backward(y))
    with warnings.catch_warnings():
        # counted above; the repeats would only print them again
        warnings.simplefilter("ignore")
        fwd_times = (t_fwd,) if t_fwd >= budget else time_within(forward, budget_s=budget).times
        bwd_times = (
            (t_bwd,)
            if t_bwd >= budget
            else time_within(backward, budget_s=budget, setup=forward).times
        )
        fwd_peak = peak_memory_bytes(forward)
        y = forward()
        bwd_peak = peak_memory_bytes(lambda: backward(y))
    warned = {k: w_fwd.get(k, 0) + w_bwd.get(k, 0) for k in {**w_fwd, **w_bwd}}
    row = {
        "method": name,
        "fwd_ms": 1e3 * statistics.median(fwd_times),
        "bwd_ms": 1e3 * statistics.median(bwd_times),
        "fwd_peak_mib": fwd_peak / MIB,
        "bwd_peak_mib": bwd_peak / MIB,
        "fwd_repeats": len(fwd_times),
        "bwd_repeats": len(bwd_times),
        "warnings": ";".join(f"{k}={n}" for k, n in sorted(warned.items())),
    }
    return row, grad


def cases(quick: bool):
    if quick:
        return [
            ("pool C=8 3x3 B=2", lambda: pool_case(2, 8, 3)),
            ("OT 6x6", lambda: ot_case(6)),
        ]
    return [
        ("pool C=512 7x7 B=32", lambda: pool_case(32, 512, 7)),
        ("pool C=128 64x64 B=1", lambda: pool_case(1, 128, 64)),
        ("OT 100x100", lambda: ot_case(100)),
        ("OT 500x500", lambda: ot_case(500)),
    ]


def warm_up() -> None:
    """The first calls into torch.func cost seconds once per process: pay them on tiny
    problems, so that no measurement (a slow first call counts as one) includes them."""
    for case in (pool_case(1, 3, 2), ot_case(3)):
        for method in case["methods"].values():
            xg = case["x"].clone().requires_grad_()
            _run(lambda m=method, xg=xg, v=case["v"]: torch.autograd.grad(m(xg), xg, v))


def _chosen(name: str, wanted: list[str] | None) -> bool:
    return wanted is None or any(w in name for w in wanted)


def run(args) -> tuple[list[dict], dict]:
    rows, grads = [], {}
    warm_up()
    for label, make in cases(args.quick):
        if not _chosen(label, args.cases):
            continue
        case = make()
        ref = None
        for name, method in case["methods"].items():
            # the reference gradient comes from the first method: always run it
            if ref is not None and not _chosen(name, args.methods):
                continue
            skip = ""
            if name == "generic full" and case["dense_bytes"] > args.dense_budget_gib * 1024**3:
                skip = f"dense H, B would need {case['dense_bytes'] / 1024**3:.0f} GiB"
            if name.startswith("generic implicit (no") and case["x"].shape[-1] > args.max_plain_m:
                skip = "CG on the raw Hessian (condition ~e^60) cannot converge; see 100x100"
            if skip:
                rows.append({"case": label, "method": name, "skipped": skip})
                print(f"{label:22s} {name:36s} skipped: {skip}", flush=True)
                continue
            row, grad = bench_method(name, method, case, args.budget)
            if ref is None:
                ref = grad
            row = {"case": label, **row, "grad_rel_diff": float((grad - ref).norm() / ref.norm())}
            grads[(label, name)] = grad
            rows.append(row)
            print(
                f"{label:22s} {name:36s} fwd {row['fwd_ms']:10.1f} ms  bwd {row['bwd_ms']:10.1f}"
                f" ms  bwd peak {row['bwd_peak_mib']:9.1f} MiB  diff {row['grad_rel_diff']:.1e}"
                f"  {row['warnings']}",
                flush=True,
            )
    return rows, grads


def targets(rows, grads, label) -> list[dict]:
    """Issue 7: at C=512, 7x7, batch 32, generic implicit's backward peak is at most 1/4 of
    generic full's, and the two gradients agree to 1e-6."""
    by = {(r["case"], r["method"]): r for r in rows}
    imp, full = by.get((label, "generic implicit")), by.get((label, "generic full"))
    if imp is None or full is None or "bwd_peak_mib" not in full:
        return []
    ratio = imp["bwd_peak_mib"] / full["bwd_peak_mib"]
    a, b = grads[(label, "generic implicit")], grads[(label, "generic full")]
    agree = float((a - b).norm() / b.norm())
    return [
        {
            "target": f"{label}: generic implicit / generic full backward peak memory",
            "measured": f"{imp['bwd_peak_mib']:.1f} / {full['bwd_peak_mib']:.1f} MiB = {ratio:.4f}",
            "limit": "<= 0.25",
            "met": ratio <= 0.25,
        },
        {
            "target": f"{label}: generic implicit vs generic full gradient (relative 2-norm)",
            "measured": f"{agree:.1e}",
            "limit": "<= 1e-6",
            "met": agree <= 1e-6,
        },
    ]


def _fmt(value, digits=1):
    if value == "" or value is None:
        return "-"
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def table(rows) -> str:
    lines = [
        "| case | method | forward ms | backward ms | fwd peak MiB | bwd peak MiB "
        "| grad. diff vs structured |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['case']} | {r['method']} | skipped: {r['skipped']} |||||")
            continue
        diff = (
            "(reference)" if r["method"] == "structured implicit" else f"{r['grad_rel_diff']:.0e}"
        )
        note = f" ({r['warnings']})" if r["warnings"] else ""
        lines.append(
            f"| {r['case']} | {r['method']}{note} | {_fmt(r['fwd_ms'])} | {_fmt(r['bwd_ms'])} "
            f"| {_fmt(r['fwd_peak_mib'])} | {_fmt(r['bwd_peak_mib'])} | {diff} |"
        )
    return "\n".join(lines)


def write_targets(path: Path, rows, results, meta) -> None:
    lines = [
        "# Generic declarative nodes: measured side by side in one run",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['cpu']}, {meta['torch_threads']} torch threads, torch {meta['torch']}, "
        f"{meta['date_utc']}",
        "",
        table(rows),
        "",
    ]
    if results:
        lines += ["| target | measured | limit | met |", "|---|---|---|---|"]
        lines += [
            f"| {t['target']} | {t['measured']} | {t['limit']} | {'yes' if t['met'] else 'NO'} |"
            for t in results
        ]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def plot(path: Path, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(2, len(labels), figsize=(4.2 * len(labels), 6.5), squeeze=False)
    for j, label in enumerate(labels):
        done = [r for r in rows if r["case"] == label and not r.get("skipped")]
        names = [r["method"].replace("generic implicit ", "generic impl.\n") for r in done]
        colors = [
            "tab:blue" if r["method"].startswith("structured") else "tab:orange" for r in done
        ]
        for i, (key, title) in enumerate(
            [("bwd_ms", "backward ms"), ("bwd_peak_mib", "backward peak MiB")]
        ):
            ax = axes[i][j]
            values = [max(float(r[key]), 1e-3) for r in done]
            # a gradient that misses the reference is marked: its time buys nothing
            wrong = [float(r["grad_rel_diff"]) > 1e-6 for r in done]
            bars = ax.barh(range(len(done)), values, color=colors)
            for bar, bad in zip(bars, wrong, strict=True):
                if bad:
                    bar.set_hatch("//")
                    bar.set_alpha(0.5)
            ax.set_xscale("log")
            ax.set_yticks(range(len(done)), names, fontsize=7)
            ax.invert_yaxis()
            ax.set_title(f"{label}: {title}", fontsize=9)
            for k, val in enumerate(values):
                text = f" {val:,.3g}" + (" (wrong gradient)" if wrong[k] else "")
                ax.text(val, k, text, va="center", fontsize=7)
    fig.suptitle(
        "Generic (orange) vs structured (blue) backward, float64, CPU; hatched: gradient off "
        "the reference by > 1e-6",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/generic"))
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per timing")
    parser.add_argument("--dense-budget-gib", type=float, default=6.0)
    parser.add_argument(
        "--max-plain-m", type=int, default=100, help="largest OT side for unpreconditioned CG"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--cases", nargs="+", default=None, help="only the cases whose label contains one of these"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="only the methods whose name contains one of these (and the structured reference)",
    )
    parser.add_argument(
        "--replot", action="store_true", help="only redraw generic.png from --out's CSV"
    )
    args = parser.parse_args(argv)
    if args.replot:
        plot(args.out / "generic.png", read_csv(args.out / "generic.csv"))
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    meta = machine_info()
    rows, grads = run(args)
    label = cases(args.quick)[0][0]
    results = targets(rows, grads, label)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "generic.csv", rows, meta)
    write_targets(args.out / "targets.md", rows, results, meta)
    plot(args.out / "generic.png", rows)
    for t in results:
        print(f"{t['target']}: {t['measured']} ({t['limit']}: {'met' if t['met'] else 'NOT met'})")
    print(f"wrote {args.out}/generic.csv, targets.md, generic.png")


if __name__ == "__main__":
    main()
