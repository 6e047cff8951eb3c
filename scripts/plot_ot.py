"""Draw the optimal transport benchmark figures from its CSV alone (no solver is run).

python scripts/plot_ot.py                       # docs/benchmarks/ot/ot.csv -> *.png
python scripts/plot_ot.py --csv /tmp/ot/ot.csv --out /tmp/ot
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from benchutil import read_csv  # noqa: E402

STYLE = {
    "implicit/auto": dict(color="C0", marker="o", label="implicit (auto)"),
    "implicit/cholesky": dict(color="C0", marker="s", ls="--", label="implicit, Cholesky"),
    "implicit/cg": dict(color="C0", marker="^", ls=":", label="implicit, CG"),
    "full/auto": dict(color="C3", marker="D", label="full (dense Eq. 3)"),
    "approx/auto": dict(color="C2", marker="v", label="approx"),
    "unroll/auto": dict(color="C1", marker="x", label="unroll (autograd)"),
    "pot/log": dict(color="C7", marker="+", label="POT sinkhorn_log + autograd"),
}


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


def plot_sizes(rows, out: Path, batch: int) -> Path | None:
    keys = [
        ("fwd_ms", "forward time (ms)"),
        ("bwd_ms", "backward time (ms)"),
        ("peak_mib", "peak memory, fwd + bwd (MiB)"),
    ]
    series = [_series(rows, "size", batch, k) for k, _ in keys]
    if not any(series):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (_key, label), ser in zip(axes, keys, series, strict=True):
        for name, (xs, ys) in ser.items():
            ax.plot(xs, ys, **STYLE.get(name, dict(label=name)))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("m = n")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Entropic OT (gamma = 10, float32), batch {batch}")
    fig.tight_layout()
    path = out / f"ot_size_b{batch}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_iterations(rows, out: Path) -> Path | None:
    ser = _series(rows, "iters", 1, "peak_mib")
    if not ser:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, (xs, ys) in ser.items():
        order = sorted(range(len(xs)), key=xs.__getitem__)
        ax.plot([xs[i] for i in order], [ys[i] for i in order], **STYLE.get(name, {}))
    m = next(r["m"] for r in rows if r["section"] == "iters")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Sinkhorn iterations (last point: run to convergence)")
    ax.set_ylabel("peak memory, fwd + bwd (MiB)")
    ax.set_title(f"Memory against iterations, {m} x {m}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "ot_iterations.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    for p in paths:
        if p is not None:
            print(f"wrote {p}")


if __name__ == "__main__":
    main()
