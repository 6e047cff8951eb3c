"""Draw a backward-mode sweep's figure and write its README from the sweep's CSV alone.

    .venv/bin/python scripts/plot_sweep.py [--csv docs/benchmarks/sweeps/classification/sweep.csv]

Writes, beside the CSV: ``sweep.png`` (four panels, one bar per run: the test metric, time
per training step, the declarative layers' forward and backward time, their backward peak
memory and the memory the forward keeps for the backward) and ``README.md`` (the table, the
command and the machine, from ``sweep.meta.json``). ``scripts/sweep.py`` writes the CSV and
calls this; ``markdown_table`` is also what ``scripts/readme_tables.py`` puts in the README.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from benchutil import read_csv  # noqa: E402
from plot_common import runnable, save  # noqa: E402

PNG = "sweep.png"
MODE_COLORS = {
    "implicit": "tab:blue",
    "full": "tab:red",
    "approx": "tab:green",
    "unroll": "tab:orange",
    "none": "tab:gray",
}
# Columns that hold numbers (everything else stays a string).
# The per-layer statistics a sweep reads from each run (``ddn/<layer>/<stat>``); *_cpu_ms: the
# CPU time of the thread that ran the layer, which other jobs on the machine do not inflate as
# they do wall time (runs from before it was measured have none)
LAYER_STATS = (
    "fwd_ms",
    "bwd_ms",
    "fwd_cpu_ms",
    "bwd_cpu_ms",
    "bwd_peak_mib",
    "saved_mib",
    "iters_mean",
)
NUMERIC = (
    "seed",
    "test_metric",
    "best_val_metric",
    "train_step_ms",
    "fit_s",
    "wall_s",
    "epochs",
    "steps",
    *LAYER_STATS,
    "load_max",
)


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """The sweep CSV's rows, numbers as floats (nan where empty)."""
    rows = []
    for r in read_csv(path):
        r = dict(r)
        for k in NUMERIC:
            if k in r:
                r[k] = _float(r[k])
        rows.append(r)
    return rows


def label(row: dict[str, Any]) -> str:
    """``robust/implicit``, ``avg`` (a pool without a declarative layer) or ``implicit``."""
    pool = row.get("pool") or ""
    if row["mode"] == "none":
        return pool
    return f"{pool}/{row['mode']}" if pool else row["mode"]


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per run: metric, time per step, layer time and memory (CSV values, rounded);
    the layer's CPU times too when the sweep measured them."""
    metric = rows[0]["metric"] if rows else "metric"
    cpu = any(not math.isnan(r.get("fwd_cpu_ms", math.nan)) for r in rows)
    head = f"| run | {metric} | step ms | layer fwd ms | layer bwd ms |"
    head += " layer fwd / bwd CPU ms |" if cpu else ""
    head += " bwd peak MiB | saved MiB | solver iters |"
    lines = [head, "|" + "---|" * (8 + cpu)]
    for r in rows:
        test = r["test_metric"]
        line = (
            f"| {label(r)} | {'-' if math.isnan(test) else f'{test:.4f}'} "
            f"| {_fmt(r['train_step_ms'])} | {_fmt(r['fwd_ms'])} | {_fmt(r['bwd_ms'])} |"
        )
        if cpu:
            line += (
                f" {_fmt(r.get('fwd_cpu_ms', math.nan))} / {_fmt(r.get('bwd_cpu_ms', math.nan))} |"
            )
        line += f" {_fmt(r['bwd_peak_mib'])} | {_fmt(r['saved_mib'])} | {_fmt(r['iters_mean'])} |"
        lines.append(line)
    return "\n".join(lines)


def _bars(ax, labels, values, colors, title, log=False, fmt="{:.3g}"):
    ys = range(len(labels))
    shown = [0.0 if math.isnan(v) else v for v in values]
    ax.barh(ys, shown, color=colors)
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    if log and any(v > 0 for v in shown):
        ax.set_xscale("log")
    for y, v in zip(ys, values, strict=True):
        text = " n/a" if math.isnan(v) else " " + fmt.format(v)
        ax.text(v if not math.isnan(v) and v > 0 else 0, y, text, va="center", fontsize=7)
    ax.margins(x=0.25)


def _paired_bars(ax, ys, upper, lower, labels, title, notes=None) -> None:
    """Two horizontal bars per row (``upper`` above ``lower``: (values, colours)), each
    labelled with its value (and the upper one with ``notes[i]`` when given), on a log axis."""
    for shift, (values, colour) in ((-0.2, upper), (0.2, lower)):
        ax.barh([y + shift for y in ys], values, height=0.4, color=colour)
        for i, (y, v) in enumerate(zip(ys, values, strict=True)):
            note = notes[i] if notes is not None and shift < 0 else ""
            ax.text(v, y + shift, f" {v:.3g}{note}", va="center", fontsize=7)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.margins(x=0.25)
    ax.set_title(title, fontsize=9)


def plot(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """The sweep's four panels as one PNG at ``path``."""
    path = Path(path)
    labels = [label(r) for r in rows]
    colors = [MODE_COLORS.get(r["mode"], "tab:purple") for r in rows]
    metric = rows[0]["metric"] if rows else "metric"
    fig, axes = plt.subplots(2, 2, figsize=(11, 2.2 + 0.45 * len(rows)))
    _bars(axes[0, 0], labels, [r["test_metric"] for r in rows], colors, metric, fmt="{:.4f}")
    lo = min((r["test_metric"] for r in rows if not math.isnan(r["test_metric"])), default=0)
    axes[0, 0].set_xlim(max(0.0, lo - 0.1), 1.0)
    _bars(
        axes[0, 1],
        labels,
        [r["train_step_ms"] for r in rows],
        colors,
        "time per training step (ms, median)",
    )
    layered = [r for r in rows if r["mode"] != "none"]
    ys = list(range(len(layered)))
    colours = [MODE_COLORS.get(r["mode"], "tab:purple") for r in layered]
    labels = [label(r) for r in layered]
    # every mode but unroll runs the same forward solver: the iterations it needed (which the
    # trained weights decide) are what sets its time apart from one run to another
    iterations = [_iterations(r) for r in layered]
    _paired_bars(
        axes[1, 0],
        ys,
        ([r["fwd_ms"] for r in layered], "tab:gray"),
        ([r["bwd_ms"] for r in layered], colours),
        labels,
        "layer time: forward (grey, solver iterations) and backward (colour), ms",
        notes=iterations,
    )
    _paired_bars(
        axes[1, 1],
        ys,
        ([r["bwd_peak_mib"] for r in layered], colours),
        ([r["saved_mib"] for r in layered], "tab:gray"),
        labels,
        "layer memory: backward peak (colour), kept by the forward (grey), MiB",
    )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path, dpi=110)


def _iterations(row: dict[str, Any]) -> str:
    value = row.get("iters_mean", math.nan)
    return "" if value is None or math.isnan(value) else f" ({value:.3g} it)"


def load_meta(csv_path: str | Path) -> dict[str, Any]:
    meta = Path(csv_path).with_suffix(".meta.json")
    return json.loads(meta.read_text()) if meta.is_file() else {}


def title_of(rows: list[dict[str, Any]]) -> str:
    task = rows[0]["task"] if rows else ""
    return f"Backward-mode sweep: {task} (same seed and budget per run)"


def write_readme(rows: list[dict[str, Any]], meta: dict[str, Any], path: str | Path) -> Path:
    """The sweep's README: what ran, where, and the table (all from the CSV and its meta)."""
    path = Path(path)
    task = rows[0]["task"] if rows else "?"
    total = meta.get("sweep_seconds")
    lines = [
        f"# Backward-mode sweep: {task}",
        "",
        "Every run trains the same model with the same seed and budget; only the backward mode"
        + (" (and for classification the final pool)" if task == "classification" else "")
        + " changes. Regenerate with the command below; redraw the figure and this file from the"
        " CSV alone with `.venv/bin/python scripts/plot_sweep.py --csv "
        f"docs/benchmarks/sweeps/{path.parent.name}/sweep.csv` (or `make plots`).",
        "",
        f"- Command: `{runnable(meta.get('command', '?'))}`",
        f"- Budget (config overlay): `{meta.get('config', '?')}`; every run: "
        f"`{' '.join(meta.get('train_args', []))}`",
        f"- Machine: {meta.get('cpu', '?')}, {meta.get('cpu_count', '?')} cores, torch "
        f"{meta.get('torch', '?')}, Python {meta.get('python', '?')}, {meta.get('date_utc', '?')}",
    ]
    if total is not None:
        lines.append(f"- Whole sweep: {total / 60:.1f} min wall ({len(rows)} runs)")
    if meta.get("shared"):
        others = "; ".join(meta.get("other_processes", [])[:4]) or "none seen"
        lines.append(
            f"- **The machine was shared** during this sweep (load average up to "
            f"{meta.get('load_max', float('nan')):.1f}; other jobs: {others}): times are upper "
            "bounds and noisy; accuracy and memory are unaffected."
        )
    if meta.get("note"):
        lines.append(f"- Note: {meta['note']}")
    elif meta and not meta.get("shared"):
        lines.append(
            f"- No other training or benchmark process ran during the sweep (load average up to "
            f"{meta.get('load_max', float('nan')):.1f})."
        )
    lines += [
        "",
        markdown_table(rows),
        "",
        "`step ms`: median wall time of a training step (forward, backward, optimiser step)."
        f" Layer columns: medians over the profiled steps ({_profiled_steps(meta)}) of the "
        "declarative layer's forward and backward wall time (on a CPU, timed on steps without "
        "the memory profiler, which measures the next one), the backward's peak memory (what "
        "the forward kept plus the backward's own peak, from the torch profiler's allocation "
        "records) and what the forward keeps for the backward; `-`: the run has no declarative"
        " layer. Every mode but `unroll` runs the same forward solver, yet each run trains its"
        " own weights, so its forward solves other problems: the figure gives the solver's mean"
        " iterations beside each forward time, which say when that matters (`approx` stopping at"
        " the iteration cap); between runs with the same iterations the difference is noise.",
        "",
        f"![sweep]({PNG})",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _profiled_steps(meta: dict[str, Any]) -> str:
    if meta.get("profiler") == "bursts":
        return (
            "a warm-up batch set aside, then 5 consecutive steps every "
            "`ddn.profile_every_n_steps` steps; `summary.json` of each run has their quartiles "
            "and count"
        )
    return "`ddn/<layer>/...`, one step every `ddn.profile_every_n_steps` steps, first dropped"


def regenerate(csv_path: str | Path) -> list[Path]:
    """Redraw ``sweep.png`` and rewrite ``README.md`` beside ``csv_path``."""
    csv_path = Path(csv_path)
    rows = load_rows(csv_path)
    png = plot(rows, csv_path.parent / PNG, title_of(rows))
    readme = write_readme(rows, load_meta(csv_path), csv_path.parent / "README.md")
    return [png, readme]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--csv",
        type=Path,
        nargs="+",
        default=[Path("docs/benchmarks/sweeps/classification/sweep.csv")],
    )
    args = ap.parse_args(argv)
    for path in args.csv:
        for written in regenerate(path):
            print(f"wrote {written}")


if __name__ == "__main__":
    main()
