"""The least a robust pooling forward can cost where L-BFGS stops at its starts, measured.

    python scripts/pool_forward_floor.py                 # docs/benchmarks/pool/forward_floor.*
    python scripts/pool_forward_floor.py --rounds 3 --out /tmp/floor   # a smoke run

On the paper's inputs (randn, alpha = 1) every point is about 11 alpha from the mean and the
median, so with welsch or truncated quadratic the gradient at both starts is about zero and
``torch.optim.LBFGS`` returns them after one evaluation each: the baseline's time is then
``torch.median`` for the median start plus four objective evaluations. A forward that follows
issue 3 (non-convex penalties take the best of the mean and the coordinate-wise median
starts) must compute the same two starts and compare their objectives before it can do
anything else. This script times, each paired round by round with the baseline of
``bench_pool.py`` (``benchutil.paired_ratio``, CPU time of one thread):

- ``forward``: ``ddn.robust_pool`` as the benchmark runs it (implicit mode, defaults);
- ``starts``: the package's own parts for the mean, the centred squared norms, the
  coordinate-wise median and the objective at both starts, then the better one: no
  iteration at all, the floor of such a forward built from these parts;
- ``median``: ``coordinate_median`` alone; ``torch_median``: ``torch.median`` alone.

Feature-like inputs, where L-BFGS iterates, are measured beside them for contrast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bench_pool import FWD_TARGET_CASES, lbfgs_pool, make_input
from benchutil import machine_info, paired_ratio, use_clock, write_csv

import ddn_layers as ddn
from ddn_layers.pooling.median import coordinate_median
from ddn_layers.pooling.points import CentredPoints

PENALTIES = ("welsch", "truncated-quadratic")
KINDS = ("randn", "feature")
OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "pool"


def starts_only(x: torch.Tensor, penalty: str, alpha: float) -> torch.Tensor:
    """The better of the mean and median starts by objective, with no iteration: x (B, C, ...)
    -> (B, C). Ties go to the mean, as in the solver."""
    p = ddn.PENALTIES[penalty]
    a = torch.tensor(alpha, dtype=x.dtype)
    x = x.flatten(2)
    with torch.no_grad():
        mean = x.mean(-1)
        pts = CentredPoints.of(x, mean)
        yc = torch.stack([mean, coordinate_median(x)], 1) - mean[:, None]
        f = p.phi(pts.sq_distances(yc).sqrt(), a).sum(-1)
        best = f.argmin(1)
        return yc[torch.arange(x.shape[0]), best] + mean


def measure(kind: str, penalty: str, case: tuple[int, int, int], alpha: float, rounds: int):
    B, C, s = case
    x = make_input(kind, B, C, s, alpha, seed=0)
    xf = x.flatten(2)

    def baseline():
        return lbfgs_pool(x, penalty, alpha)

    candidates = {
        "forward": lambda: ddn.robust_pool(x, penalty, alpha, backward_mode="implicit"),
        "starts": lambda: starts_only(x, penalty, alpha),
        "median": lambda: coordinate_median(xf),
        "torch_median": lambda: xf.median(-1),
    }
    row = {"kind": kind, "penalty": penalty, "B": B, "C": C, "s": s, "n": s * s}
    lbfgs_ms = []
    for name, fn in candidates.items():
        ratio, t, t_lbfgs = paired_ratio(fn, baseline, rounds=rounds)
        row[f"{name}_ms"] = 1e3 * t
        row[f"{name}_over_lbfgs"] = ratio
        lbfgs_ms.append(1e3 * t_lbfgs)
    row["lbfgs_ms"] = sorted(lbfgs_ms)[len(lbfgs_ms) // 2]
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    cols = ("forward", "starts", "median", "torch_median")
    lines = [
        "# Forward / L-BFGS: our forward, the starts alone, the medians alone",
        "",
        f"`{meta['command']}` on {meta['cpu']}, torch {meta['torch']}, "
        f"{meta['torch_threads']} thread, {meta['clock']} clock, {meta['date_utc']}.",
        "Each ratio is the median over the rounds of a pairing with the L-BFGS baseline.",
        "",
        "| kind | penalty | B C s | L-BFGS ms | " + " | ".join(cols) + " |",
        "|---|---|---|---|" + "---|" * len(cols),
    ]
    for r in rows:
        cells = " | ".join(f"{r[c + '_over_lbfgs']:.3f} ({r[c + '_ms']:.2f} ms)" for c in cols)
        lines.append(
            f"| {r['kind']} | {r['penalty']} | {r['B']} {r['C']} {r['s']} | "
            f"{r['lbfgs_ms']:.1f} | {cells} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--cases", nargs="+", help="B,C,s triples (default: the target's cases)")
    args = ap.parse_args(argv)
    use_clock("cpu")
    cases = FWD_TARGET_CASES
    if args.cases:
        cases = tuple(tuple(int(v) for v in c.split(",")) for c in args.cases)
    rows = []
    for kind in args.kinds:
        for case in cases:
            for penalty in PENALTIES:
                rows.append(measure(kind, penalty, case, args.alpha, args.rounds))
                r = rows[-1]
                print(
                    f"{kind:8s} {penalty:20s} B={r['B']} C={r['C']} s={r['s']}: L-BFGS "
                    f"{r['lbfgs_ms']:.1f} ms, forward {r['forward_over_lbfgs']:.3f}, starts "
                    f"{r['starts_over_lbfgs']:.3f}, median {r['median_over_lbfgs']:.3f}",
                    flush=True,
                )
    meta = machine_info()
    write_csv(args.out / "forward_floor.csv", rows, meta)
    (args.out / "forward_floor.md").write_text(markdown(rows, meta), encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
