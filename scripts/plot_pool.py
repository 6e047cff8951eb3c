"""Draw the robust pooling benchmark's figures from its CSV alone.

    .venv/bin/python scripts/plot_pool.py [--csv docs/benchmarks/pool/pool.csv]

Writes, beside the CSV: ``fig1_<kind>.png`` (the paper's Fig. 1: time and peak memory of the
forward and the implicit backward against the number of points, one line per penalty, with
the L-BFGS forward dashed), ``modes_<kind>.png`` (backward time and memory of every mode and
Hessian route) and ``resnet.png`` (the C=512, 7x7, batch-32 case).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from benchutil import read_csv  # noqa: E402
from plot_common import emphasis, legend_below, save  # noqa: E402

PENALTIES = ("quadratic", "pseudo-huber", "huber", "welsch", "truncated-quadratic")
LBFGS = "torch.optim.LBFGS"
# The default (implicit, auto) first; each variant has its own marker so that lines lying on
# one another stay told apart.
MARKERS = ("o", "s", "^", "D", "v", "x")
VARIANTS = [
    ("implicit", "auto", "implicit (auto)"),
    ("implicit", "cholesky", "implicit, C x C Cholesky"),
    ("implicit", "woodbury", "implicit, n x n Woodbury"),
    ("full", "auto", "full (explicit B_j)"),
    ("approx", "auto", "approx"),
    ("unroll", "auto", "unroll"),
]


def _num(rows):
    out = []
    for r in rows:
        r = dict(r)
        for k in ("B", "C", "s", "n"):
            r[k] = int(r[k])
        for k, v in list(r.items()):
            if k.endswith(("_ms", "_mib")) and v != "":
                r[k] = float(v)
        out.append(r)
    return out


def _series(rows, kind, penalty, mode, solver=None, key="bwd_ms"):
    pts = sorted(
        (r["n"], r[key])
        for r in rows
        if r["kind"] == kind
        and r["penalty"] == penalty
        and r["mode"] == mode
        and (solver is None or r["solver"] == solver)
        and r["C"] == 128
        and r["B"] == 1
        and r.get(key, "") != ""
        and r[key] > 0  # a log axis cannot show 0 (e.g. no allocation at all)
    )
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot(ax, n, v, *args, **kw) -> None:
    if n:  # skip series a partial run did not measure
        ax.plot(n, v, *args, **kw)


def _log_axes(ax, **kw) -> None:
    """Log-log when the panel has data; a panel left empty by a partial run stays linear."""
    ax.set(**kw)
    if ax.has_data():
        ax.set(xscale="log", yscale="log")
    ax.grid(True, which="both", alpha=0.3)


def fig1(rows, kind, out: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(10, 8.3))
    panels = [
        ("fwd_ms", "forward time (ms)"),
        ("bwd_ms", "backward time (ms), implicit"),
        ("fwd_peak_mib", "forward peak memory (MiB)"),
        ("bwd_peak_mib", "backward peak memory (MiB), implicit"),
    ]
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for i, pen in enumerate(PENALTIES):
            n, v = _series(rows, kind, pen, "implicit", "auto", key)
            _plot(ax, n, v, "o-", color=f"C{i}", label=pen)
            if key == "fwd_ms" and pen != "quadratic":
                n, v = _series(rows, kind, pen, "lbfgs", None, key)
                _plot(ax, n, v, "x--", color=f"C{i}", alpha=0.6, label=f"{pen}, L-BFGS")
        _log_axes(ax, title=title)
    for ax in axes[1]:
        ax.set_xlabel("points n = s x s (C = 128, batch 1)")
    bottom = legend_below(fig, axes.flat, ncol=5, fontsize=7)
    fig.suptitle(f"Robust vector pooling on this CPU, float32, {kind} input")
    fig.tight_layout(rect=(0, bottom, 1, 1))
    save(fig, out / f"fig1_{kind}.png", dpi=110)


def modes(rows, kind, out: Path) -> None:
    pens = ("pseudo-huber", "welsch")
    fig, axes = plt.subplots(2, len(pens), figsize=(11, 8.2))
    for j, pen in enumerate(pens):
        panels = (("bwd_ms", 0, "time (ms)"), ("bwd_peak_mib", 1, "peak memory (MiB)"))
        for key, row, label in panels:
            ax = axes[row, j]
            # the default last, over the others: its hollow markers let theirs show through
            order = list(enumerate(VARIANTS))[1:] + [(0, VARIANTS[0])]
            for i, (mode, solver, name) in order:
                n, v = _series(rows, kind, pen, mode, solver, key)
                style = dict(color=f"C{i}", marker=MARKERS[i], label=name, **emphasis(i == 0))
                _plot(ax, n, v, **style)
            _log_axes(ax, title=f"{pen}: backward {label}")
        axes[1, j].set_xlabel("points n (C = 128, batch 1)")
    bottom = legend_below(fig, axes.flat, ncol=3)
    fig.suptitle(f"Backward modes, float32, {kind} input")
    fig.tight_layout(rect=(0, bottom, 1, 1))
    save(fig, out / f"modes_{kind}.png", dpi=110)


def resnet(rows, out: Path) -> None:
    res = {(r["kind"], r["penalty"], r["mode"], r["solver"]): r for r in rows if r["C"] == 512}
    if not res:
        return
    kinds = sorted({k[0] for k in res})
    fig, axes = plt.subplots(len(kinds), 2, figsize=(16, 4.2 * len(kinds)), squeeze=False)

    def bars(ax, series, key):
        width = 0.8 / len(series)
        for i, (mode, solver, label) in enumerate(series):
            vals = [res.get((kind, pen, mode, solver), {}).get(key, nan) for pen in PENALTIES]
            ax.bar([p + i * width for p in range(len(PENALTIES))], vals, width, label=label)
        ax.set_xticks([p + 0.4 - width / 2 for p in range(len(PENALTIES))], PENALTIES, fontsize=8)
        ax.set_yscale("log")
        # beside the bars, not over them
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)

    nan = float("nan")
    for k, kind in enumerate(kinds):
        bars(axes[k, 0], VARIANTS, "bwd_ms")
        axes[k, 0].set(ylabel="backward time (ms)", title=f"C=512, 7x7, batch 32, {kind}")
        lbfgs = [("implicit", "auto", "ours (IRLS + Newton)"), ("lbfgs", LBFGS, "L-BFGS")]
        bars(axes[k, 1], lbfgs, "fwd_ms")
        axes[k, 1].set(ylabel="forward time (ms)", title=f"forward, {kind}")
    fig.tight_layout()
    save(fig, out / "resnet.png", dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", type=Path, default=Path("docs/benchmarks/pool/pool.csv"))
    args = ap.parse_args(argv)
    rows = _num(read_csv(args.csv))
    out = args.csv.parent
    for kind in sorted({r["kind"] for r in rows}):
        fig1(rows, kind, out)
        modes(rows, kind, out)
    resnet(rows, out)
    print(f"figures written to {out}")


if __name__ == "__main__":
    main()
