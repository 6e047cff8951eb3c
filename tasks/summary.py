"""The table printed at the end of a run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_table(
    title: str, rows: Mapping[str, Any], layers: Mapping[str, Mapping[str, float]]
) -> list[Table]:
    """A key/value table of the run, and one row per declarative layer of its profile."""
    run = Table(title=title, show_header=False, title_justify="left")
    run.add_column(style="bold")
    run.add_column()
    for key, value in rows.items():
        if value is not None:
            run.add_row(key, _fmt(value))
    tables = [run]
    if layers:
        stats = sorted({s for v in layers.values() for s in v})
        prof = Table(title="Declarative layers (median over profiled steps)", title_justify="left")
        prof.add_column("layer", style="bold")
        for stat in stats:
            prof.add_column(stat, justify="right")
        for layer, values in layers.items():
            prof.add_row(layer, *(_fmt(values.get(s, "")) for s in stats))
        tables.append(prof)
    return tables


def print_summary(
    title: str, rows: Mapping[str, Any], layers: Mapping[str, Mapping[str, float]]
) -> None:
    console = Console()
    for table in summary_table(title, rows, layers):
        console.print(table)
