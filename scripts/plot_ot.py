"""Draw the optimal transport benchmark figures from its CSV alone (no solver is run).

.venv/bin/python scripts/plot_ot.py                 # docs/benchmarks/ot/ot.csv -> *.png
                                                    # (and iterations.csv beside it)
.venv/bin/python scripts/plot_ot.py --csv /tmp/ot/ot.csv --out /tmp/ot

The forward panel draws one line for the modes that run the same forward solver (their
measured forward times differ by noise only), labelled with the solver's iterations.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from benchutil import read_csv  # noqa: E402
from plot_common import emphasis, legend_below, save  # noqa: E402

STYLE = {
    "implicit/auto": dict(color="C0", marker="o", label="implicit (auto)"),
    "implicit/cholesky": dict(color="C0", marker="s", ls="--", label="implicit, Cholesky"),
    "implicit/cg": dict(color="C0", marker="^", ls=":", label="implicit, CG"),
    "full/auto": dict(color="C3", marker="D", label="full (dense Eq. 3)"),
    "approx/auto": dict(color="C2", marker="v", label="approx"),
    "unroll/auto": dict(color="C1", marker="x", label="unroll (autograd)"),
    "pot/log": dict(color="C7", marker="+", label="POT sinkhorn_log + autograd"),
}


# Modes whose forward is the same solver run (they differ in the backward only): their forward
# times differ by noise alone, so the figure shows one forward line for them.
SHARED_FORWARD = ("implicit/auto", "implicit/cholesky", "implicit/cg", "full/auto", "approx/auto")
DEFAULT = "implicit/auto"


def _series(rows, section, batch, key):
    out: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        if row["section"] != section or int(row["batch"]) != batch or not row[key]:
            continue
        name = f"{row['mode']}/{row['solver']}"
        xs, ys = out.setdefault(name, ([], []))
        x = row["m"] if section == "size" else row["iterations"]
        if not x:  # an iteration count the peer does not report
            continue
        xs.append(float(x))
        ys.append(float(row[key]))
    return out


def _shared_forward(rows, batch):
    """Per size, the median forward time of the modes in SHARED_FORWARD and its iterations."""
    times: dict[float, list[float]] = {}
    iterations: dict[float, str] = {}
    for row in rows:
        name = f"{row['mode']}/{row['solver']}"
        if row["section"] != "size" or int(row["batch"]) != batch or name not in SHARED_FORWARD:
            continue
        if row["fwd_ms"]:
            times.setdefault(float(row["m"]), []).append(float(row["fwd_ms"]))
            iterations[float(row["m"])] = row["iterations"]
    xs = sorted(times)
    return xs, [statistics.median(times[x]) for x in xs], [iterations[x] for x in xs]


def _draw(ax, name, xs, ys) -> None:
    style = {**STYLE.get(name, dict(label=name)), **emphasis(name == DEFAULT)}
    ax.plot(xs, ys, **style)


def _forward_panel(ax, rows, batch, ser) -> None:
    xs, ys, iterations = _shared_forward(rows, batch)
    if xs:
        label = "forward of implicit, full, approx (one solver; median of their runs)"
        ax.plot(xs, ys, color="k", marker="o", lw=2, zorder=4, label=label)
        for x, y, it in zip(xs, ys, iterations, strict=True):
            # the iterations the solver needed explain the time at each size
            ax.annotate(f"{it} it", (x, y), textcoords="offset points", xytext=(4, -11), fontsize=7)
    for name, (sx, sy) in ser.items():
        if name not in SHARED_FORWARD:
            _draw(ax, name, sx, sy)


def plot_sizes(rows, out: Path, batch: int) -> Path | None:
    keys = [
        ("fwd_ms", "forward time (ms)"),
        ("bwd_ms", "backward time (ms)"),
        ("peak_mib", "peak memory, fwd + bwd (MiB)"),
    ]
    series = [_series(rows, "size", batch, k) for k, _ in keys]
    if not any(series):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    for ax, (key, label), ser in zip(axes, keys, series, strict=True):
        if key == "fwd_ms":
            _forward_panel(ax, rows, batch, ser)
        else:
            for name in sorted(ser, key=lambda n: n == DEFAULT):  # the default drawn last
                _draw(ax, name, *ser[name])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("m = n")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    bottom = legend_below(fig, axes, ncol=4)
    fig.suptitle(f"Entropic OT (gamma = 10, float32), batch {batch}")
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return save(fig, out / f"ot_size_b{batch}.png", dpi=120)


def plot_iterations(rows, out: Path) -> Path | None:
    ser = _series(rows, "iters", 1, "peak_mib")
    if not ser:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 5.0))
    for name in sorted(ser, key=lambda n: n == DEFAULT):  # the default drawn last
        xs, ys = ser[name]
        order = sorted(range(len(xs)), key=xs.__getitem__)
        _draw(ax, name, [xs[i] for i in order], [ys[i] for i in order])
    m = next(r["m"] for r in rows if r["section"] == "iters")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Sinkhorn iterations (last point: run to convergence)")
    ax.set_ylabel("peak memory, fwd + bwd (MiB)")
    ax.set_title(f"Memory against iterations, {m} x {m}")
    ax.grid(True, which="both", alpha=0.3)
    bottom = legend_below(fig, [ax], ncol=2)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return save(fig, out / "ot_iterations.png", dpi=120)


GAMMA_STYLE = {
    "ours": dict(color="C0", marker="o", label="ours (annealed where gamma x spread > 500)"),
    "ours_no_anneal": dict(color="C0", marker="s", ls="--", label="ours, one stage"),
    "pot_sinkhorn_log": dict(color="C7", marker="+", label="POT sinkhorn_log"),
    "pot_sinkhorn_epsilon_scaling": dict(
        color="C3", marker="x", label="POT sinkhorn_epsilon_scaling"
    ),
}


def plot_gamma(rows, out: Path) -> Path | None:
    """Iterations to tol against gamma (iterations.csv), one panel per cost scale; a method
    that never met tol within its cap has no point there."""
    if not rows:
        return None
    scales = sorted({float(r["scale"]) for r in rows})
    fig, axes = plt.subplots(1, len(scales), figsize=(6.2 * len(scales), 5.0), squeeze=False)
    for ax, scale in zip(axes[0], scales, strict=True):
        mine = [r for r in rows if float(r["scale"]) == scale]
        for name, style in GAMMA_STYLE.items():
            pts = [(float(r["gamma"]), float(r[f"{name}_iterations"])) for r in mine]
            pts = [(x, y) for x, y in pts if y == y]  # noqa: PLR0124 - NaN: never met tol
            if pts:
                ax.plot(*zip(*pts, strict=True), **{**style, **emphasis(name == "ours")})
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("gamma")
        ax.set_ylabel("iterations to tol 1e-6 (worse of 2 samples)")
        ax.set_title(f"costs randn x {scale:g}, 50 x 60, float64")
        ax.grid(True, which="both", alpha=0.3)
    bottom = legend_below(fig, list(axes[0]), ncol=2)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return save(fig, out / "ot_gamma_iterations.png", dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csv", default="docs/benchmarks/ot/ot.csv")
    ap.add_argument("--out", default=None, help="folder for the PNGs (default: the CSV's)")
    args = ap.parse_args(argv)
    rows = read_csv(args.csv)
    out = Path(args.out or Path(args.csv).parent)
    out.mkdir(parents=True, exist_ok=True)
    batches = sorted({int(r["batch"]) for r in rows if r["section"] == "size"})
    paths = [plot_sizes(rows, out, b) for b in batches] + [plot_iterations(rows, out)]
    gamma_csv = Path(args.csv).parent / "iterations.csv"
    if gamma_csv.exists():
        rows = [{k: (v if v != "" else "nan") for k, v in r.items()} for r in read_csv(gamma_csv)]
        paths.append(plot_gamma(rows, out))
    for p in paths:
        if p is not None:
            print(f"wrote {p}")


if __name__ == "__main__":
    main()
