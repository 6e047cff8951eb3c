"""Write the README's results tables from the committed benchmark CSVs.

    .venv/bin/python scripts/readme_tables.py            # rewrite README.md between the markers
    .venv/bin/python scripts/readme_tables.py --check    # exit 1 if README.md disagrees

The block between ``<!-- results:begin -->`` and ``<!-- results:end -->`` is generated, never
edited by hand: one table per layer (optimal transport from ``docs/benchmarks/ot/ot.csv``,
robust pooling from ``docs/benchmarks/pool/pool.csv``) with the time and peak memory of each
backward mode at the paper's sizes, POT's autograd Sinkhorn beside the OT layer where the CSV
has it, and the table of every sweep (``docs/benchmarks/sweeps/<task>/sweep.csv``). When a
benchmark is rerun, rerunning this script updates the README; a test checks that they agree.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import plot_sweep
from benchutil import read_csv
from plot_common import runnable

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
OT_SIZE = 500  # the paper's Fig. 3 size; the largest measured batch-1 size when absent
OT_VARIANTS = [
    ("implicit", "auto", "`implicit` (auto)"),
    ("implicit", "cholesky", "`implicit`, Cholesky"),
    ("implicit", "cg", "`implicit`, CG"),
    ("full", "auto", "`full`"),
    ("approx", "auto", "`approx`"),
    ("unroll", "auto", "`unroll`"),
    ("pot", None, "POT `ot.sinkhorn` + autograd"),
]
POOL_CASES = [(32, 512, 7, "C=512, 7x7, batch 32 (ResNet)"), (1, 128, 64, "C=128, 64x64, batch 1")]
POOL_PENALTY, POOL_KIND = "pseudo-huber", "randn"
POOL_VARIANTS = [
    ("implicit", "auto", "`implicit` (auto)"),
    ("implicit", "cholesky", "`implicit`, C x C Cholesky"),
    ("implicit", "woodbury", "`implicit`, n x n Woodbury"),
    ("full", "auto", "`full`"),
    ("approx", "auto", "`approx`"),
    ("unroll", "auto", "`unroll`"),
    ("lbfgs", None, "torch L-BFGS forward (the paper's)"),
]
SWEEP_TASKS = ("classification", "matching")


def _num(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _g(value: float) -> str:
    """Three significant digits, never in exponent notation."""
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.2g}"


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{_g(value / 1000)} s" if value >= 999.5 else f"{_g(value)} ms"


def _mib(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{_g(value / 1024)} GiB" if value >= 1023.5 else f"{_g(value)} MiB"


def _meta(csv_path: Path) -> dict:
    meta = csv_path.with_suffix(".meta.json")
    return json.loads(meta.read_text()) if meta.is_file() else {}


def _machine(meta: dict) -> str:
    if not meta:
        return "machine not recorded"
    threads = meta.get("torch_threads")
    where = meta.get("gpu") or f"{meta.get('cpu', '?')}, {meta.get('cpu_count', '?')} cores"
    return (
        f"{where}, {threads} torch thread{'s' if threads != 1 else ''}, "
        f"{meta.get('date_utc', '?')[:10]}: `{runnable(meta.get('command', '?'))}`"
    )


def ot_table(csv_path: Path, root: Path = ROOT) -> str:
    rows = [r for r in read_csv(csv_path) if r["section"] == "size" and r["batch"] == "1"]
    sizes = sorted({int(r["m"]) for r in rows if r["m"] == r["n"]})
    if not sizes:
        return "(no batch-1 rows in the OT benchmark CSV)"
    size = OT_SIZE if OT_SIZE in sizes else sizes[-1]
    devices = sorted({r["device"] for r in rows if int(r["m"]) == size})
    lines = []
    for device in devices:
        at = [r for r in rows if int(r["m"]) == size and r["device"] == device]
        lines += [
            f"Optimal transport, {size} x {size}, batch 1, float32, gamma 10, {device} "
            f"(`{csv_path.relative_to(root)}`; {_machine(_meta(csv_path))}):",
            "",
            "| backward | forward | backward | peak memory (fwd + bwd) | iterations |",
            "|---|---|---|---|---|",
        ]
        for mode, solver, name in OT_VARIANTS:
            match = [
                r for r in at if r["mode"] == mode and (solver is None or r["solver"] == solver)
            ]
            if not match:
                if mode in ("unroll", "pot"):
                    lines.append(f"| {name} | not measured at this size | | | |")
                continue
            r = match[0]
            lines.append(
                f"| {name} | {_ms(_num(r['fwd_ms']))} | {_ms(_num(r['bwd_ms']))} "
                f"| {_mib(_num(r['peak_mib']))} | {r.get('iterations') or '-'} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


def pool_table(csv_path: Path, root: Path = ROOT) -> str:
    rows = [
        r for r in read_csv(csv_path) if r["kind"] == POOL_KIND and r["penalty"] == POOL_PENALTY
    ]
    cases = [
        c
        for c in POOL_CASES
        if any(int(r["B"]) == c[0] and int(r["C"]) == c[1] and int(r["s"]) == c[2] for r in rows)
    ]
    if not cases:
        return "(no paper-sized rows in the pooling benchmark CSV)"
    head = (
        "| backward | "
        + " | ".join(f"{label}: forward | backward | backward peak" for *_, label in cases)
        + " |"
    )
    lines = [
        f"Robust pooling ({POOL_PENALTY}, alpha 1, {POOL_KIND} input, float32, cpu; "
        f"`{csv_path.relative_to(root)}`; {_machine(_meta(csv_path))}):",
        "",
        head,
        "|---|" + "---|---|---|" * len(cases),
    ]
    for mode, solver, name in POOL_VARIANTS:
        cells = []
        for B, C, s, _ in cases:
            match = [
                r
                for r in rows
                if (int(r["B"]), int(r["C"]), int(r["s"])) == (B, C, s)
                and r["mode"] == mode
                and (solver is None or r["solver"] == solver)
            ]
            if not match:
                cells += ["-", "-", "-"]
                continue
            r = match[0]
            cells += [
                _ms(_num(r["fwd_ms"])),
                _ms(_num(r.get("bwd_ms"))),
                _mib(_num(r.get("bwd_peak_mib"))),
            ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_tables(root: Path) -> str:
    parts = []
    for task in SWEEP_TASKS:
        csv_path = root / "docs" / "benchmarks" / "sweeps" / task / "sweep.csv"
        if not csv_path.is_file():
            parts.append(f"Sweep `{task}`: not run yet (`make sweep TASK={task}`).")
            continue
        rows = plot_sweep.load_rows(csv_path)
        meta = _meta(csv_path)
        minutes = meta.get("sweep_seconds", math.nan) / 60
        shared = (
            " The machine was shared with other jobs: times are upper bounds."
            if meta.get("shared")
            else ""
        )
        parts += [
            f"Sweep `{task}` ([details](docs/benchmarks/sweeps/{task}/README.md), "
            f"{len(rows)} runs in {minutes:.1f} min; {_machine(meta)}).{shared}",
            "",
            plot_sweep.markdown_table(rows),
            "",
            f"![{task} sweep](docs/benchmarks/sweeps/{task}/sweep.png)",
        ]
        parts.append("")
    return "\n".join(parts).rstrip()


def render(root: Path = ROOT) -> str:
    """The generated block, markers included."""
    bench = root / "docs" / "benchmarks"
    body = [
        BEGIN,
        "<!-- generated by `.venv/bin/python scripts/readme_tables.py` from the CSVs; "
        "do not edit -->",
        "",
        "### Layers at the paper's sizes",
        "",
        ot_table(bench / "ot" / "ot.csv", root),
        "",
        pool_table(bench / "pool" / "pool.csv", root),
        "",
        "### Training sweeps: one run per backward mode, same seed and budget",
        "",
        sweep_tables(root),
        END,
    ]
    return "\n".join(body)


def rewrite(readme: str, block: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README has no {BEGIN} ... {END} block")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + block + tail


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--root", type=Path, default=ROOT, help="where docs/benchmarks/ is")
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = ap.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    new = rewrite(text, render(args.root))
    if args.check:
        if new != text:
            print(
                f"{args.readme} disagrees with the CSVs: run .venv/bin/python "
                "scripts/readme_tables.py"
            )
            return 1
        print(f"{args.readme} agrees with the CSVs")
        return 0
    if new != text:
        args.readme.write_text(new, encoding="utf-8")
        print(f"rewrote the results tables in {args.readme}")
    else:
        print(f"{args.readme} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
