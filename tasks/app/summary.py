"""What a run prints at its start and end: the model's table, and the end-of-run summary.

The end-of-run summary is two tables (the run, and the declarative layers' statistics with
their spread and the number of steps they rest on) followed by the paths and commands a user
copies, each on a line of its own so that no table cell wraps them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pytorch_lightning.callbacks import RichModelSummary
from pytorch_lightning.utilities.model_summary import get_human_readable_count
from rich.console import Console
from rich.table import Table

from tasks.app.stats import is_spread


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:#.4g}"
    return str(value)


def layer_table(stats: Mapping[str, Any]) -> Table | None:
    """One row per ``ddn/<layer>/<statistic>``: median, quartiles and the count of steps."""
    rows = []
    for key, value in stats.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "ddn" and is_spread(value):
            rows.append((parts[1], parts[2], value))
    if not rows:
        return None
    table = Table(
        title="Declarative layers, per training step (p25-p75: the middle half)",
        title_justify="left",
    )
    for name in ("layer", "statistic"):
        table.add_column(name, style="bold", no_wrap=True)
    for name in ("median", "p25", "p75", "n steps"):
        table.add_column(name, justify="right", no_wrap=True)
    for layer, stat, v in rows:
        table.add_row(layer, stat, _fmt(v["median"]), _fmt(v["p25"]), _fmt(v["p75"]), str(v["n"]))
    return table


def summary_table(title: str, rows: Mapping[str, Any], stats: Mapping[str, Any]) -> list[Table]:
    """A key/value table of the run, and the table of the declarative layers' statistics."""
    run = Table(title=title, show_header=False, title_justify="left")
    run.add_column(style="bold", no_wrap=True)
    run.add_column(overflow="fold")
    for key, value in rows.items():
        if value is not None:
            run.add_row(key, _fmt(value))
    layers = layer_table(stats)
    return [run] if layers is None else [run, layers]


def print_summary(
    title: str,
    rows: Mapping[str, Any],
    stats: Mapping[str, Any],
    lines: Sequence[tuple[str, str]] = (),
) -> None:
    """The tables, then each ``(label, text)`` of ``lines`` as the label and, on the next
    line, the text alone (a path or a command, copyable as printed)."""
    console = Console()
    for table in summary_table(title, rows, stats):
        console.print(table)
    for label, text in lines:
        print(f"{label}:\n  {text}", flush=True)


class ModelTable(RichModelSummary):
    """Lightning's rich model summary, without the FLOPs column and total when Lightning counted
    none (it counts them only for a model with an example input)."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        columns = [(n, v) for n, v in summary_data if n != "FLOPs" or total_flops]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name, justify="right" if name == "Params" else "left")
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console = Console()
        console.print(table)
        flops = f", FLOPs {get_human_readable_count(total_flops)}" if total_flops else ""
        console.print(
            f"params: {get_human_readable_count(trainable_parameters)} trainable, "
            f"{get_human_readable_count(total_parameters)} total, {model_size:.3g} MB{flops}; "
            f"modules: {total_training_modes['train']} in train mode, "
            f"{total_training_modes['eval']} in eval mode",
            soft_wrap=True,
        )
