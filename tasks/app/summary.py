"""The table printed at the end of a run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:#.4g}"
    return str(value)


def summary_table(
    title: str, rows: Mapping[str, Any], layers: Mapping[str, Mapping[str, float]]
) -> list[Table]:
    """A key/value table of the run, and a table of statistics by declarative layer."""
    run = Table(title=title, show_header=False, title_justify="left")
    run.add_column(style="bold", no_wrap=True)
    run.add_column(overflow="fold")
    for key, value in rows.items():
        if value is not None:
            run.add_row(key, _fmt(value))
    tables = [run]
    if layers:
        # One column per layer: there are few layers and many statistics.
        prof = Table(title="Declarative layers (median over profiled steps)", title_justify="left")
        prof.add_column("statistic", style="bold", no_wrap=True)
        for layer in layers:
            prof.add_column(layer, justify="right")
        for stat in sorted({s for v in layers.values() for s in v}):
            prof.add_row(stat, *(_fmt(v.get(stat, "")) for v in layers.values()))
        tables.append(prof)
    return tables


def print_summary(
    title: str, rows: Mapping[str, Any], layers: Mapping[str, Mapping[str, float]]
) -> None:
    console = Console()
    for table in summary_table(title, rows, layers):
        console.print(table)
