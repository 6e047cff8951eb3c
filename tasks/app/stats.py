"""Robust statistics of repeated measurements: the median, the quartiles and the count."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from typing import Any

STAT_KEYS = ("median", "p25", "p75", "n")


def spread(values: Iterable[float]) -> dict[str, float | int]:
    """``{"median", "p25", "p75", "n"}`` of ``values`` (quartiles interpolated between the
    sorted values, as numpy's default; with one value all three are that value)."""
    data = sorted(float(v) for v in values)
    if not data:
        raise ValueError("values must hold at least one number")
    if len(data) == 1:
        p25 = p75 = data[0]
    else:
        p25, _, p75 = statistics.quantiles(data, n=4, method="inclusive")
    return {"median": statistics.median(data), "p25": p25, "p75": p75, "n": len(data)}


def is_spread(value: Any) -> bool:
    return isinstance(value, Mapping) and set(STAT_KEYS) <= set(value)


def medians(stats: Mapping[str, Any]) -> dict[str, float]:
    """Each statistic reduced to its median (plain numbers pass through)."""
    return {k: float(v["median"]) if is_spread(v) else v for k, v in stats.items()}
