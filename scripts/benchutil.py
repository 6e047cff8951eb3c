"""Helpers shared by the benchmark scripts: timing, peak memory, CSV output, machine info.

Import it as ``from benchutil import ...`` from a script run as ``python scripts/<name>.py``
(the script's folder is then on ``sys.path``), or as ``scripts.benchutil`` from the repository
root (tests do that).

Peak memory follows DESIGN.md. On CPU, PyTorch keeps no allocator high-water mark, so the
callable runs under ``torch.autograd.profiler.profile(profile_memory=True)`` and the signed
``[memory]`` records (allocations positive, frees negative) are summed in time order; the
maximum of that running sum is the peak of memory allocated *during* the call, relative to
what was live when it started. On CUDA the allocator's own high-water mark is used, also
relative to the memory allocated at the start.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MIB = 1024 * 1024

# The clock every timing here reads. Wall time by default; `use_clock("cpu")` switches to the
# CPU time of the calling thread (torch then runs on that one thread), which a shared virtual
# machine's steal time does not inflate: on the 2-core VM these benchmarks were developed on,
# vmstat showed 36-81% steal under load, and wall-clock ratios of the same two operations
# moved by 3x between runs while thread-time ratios stayed within a few percent.
_clock: Callable[[], float] = time.perf_counter
_clock_name = "wall"


def use_clock(name: str) -> None:
    """``"wall"`` (perf_counter; any threads) or ``"cpu"`` (this thread's CPU time, 1 thread)."""
    global _clock, _clock_name
    if name == "cpu":
        torch.set_num_threads(1)
        _clock, _clock_name = time.thread_time, "cpu"
    elif name == "wall":
        _clock, _clock_name = time.perf_counter, "wall"
    else:
        raise ValueError(f"clock must be 'wall' or 'cpu', got {name!r}")


def clock_name() -> str:
    return _clock_name


def now() -> float:
    """The current reading of the benchmark clock, in seconds."""
    return _clock()


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of the timed repeats (warm-up runs excluded)."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued kernels, so that a timer brackets the work and not just its launch."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(
    fn: Callable[[], Any],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then the wall time of ``repeats`` calls.

    ``setup`` (untimed) runs before every call, e.g. to rebuild the autograd graph that a timed
    backward consumes; when given, ``fn`` is called with its return value.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times = []
    for i in range(warmup + repeats):
        args = (setup(),) if setup is not None else ()
        synchronize(device)
        t0 = _clock()
        fn(*args)
        synchronize(device)
        if i >= warmup:
            times.append(_clock() - t0)
    return Timing(tuple(times))


def time_within(
    fn: Callable[..., Any],
    *,
    budget_s: float = 2.0,
    max_repeats: int = 7,
    device: torch.device | str | None = None,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    """Time ``fn`` with as many repeats as fit in about ``budget_s`` (at least one).

    One untimed call absorbs one-time costs (lazy library initialisation); the next sets the
    count, and a call that alone exceeds the budget is reported as the single measurement, so
    slow baselines (seconds per call) cost two runs.
    """
    fn(*((setup(),) if setup is not None else ()))
    args = (setup(),) if setup is not None else ()
    synchronize(device)
    t0 = _clock()
    fn(*args)
    synchronize(device)
    first = _clock() - t0
    if first >= budget_s:
        return Timing((first,))
    repeats = int(min(max_repeats, max(1, budget_s // max(first, 1e-9))))
    return time_callable(fn, repeats=repeats, warmup=0, device=device, setup=setup)


def paired_ratio(
    fn_a: Callable[..., Any],
    fn_b: Callable[..., Any],
    *,
    rounds: int = 21,
    setup_a: Callable[[], Any] | None = None,
    setup_b: Callable[[], Any] | None = None,
    device: torch.device | str | None = None,
) -> tuple[float, float, float]:
    """Median over ``rounds`` of time(a) / time(b), a and b timed back to back in each round.

    Interleaving puts both sides of a ratio under the same machine state (frequency, cache and
    memory-bus contention from other processes), which a ratio of two separately taken
    medians does not. Returns (median ratio, median time of a, median time of b), seconds.
    """
    ratios, ta, tb = [], [], []
    for i in range(rounds + 1):  # round 0 warms up
        pair = []
        for fn, setup in ((fn_a, setup_a), (fn_b, setup_b)):
            args = (setup(),) if setup is not None else ()
            synchronize(device)
            t0 = _clock()
            fn(*args)
            synchronize(device)
            pair.append(_clock() - t0)
        if i:
            ta.append(pair[0])
            tb.append(pair[1])
            ratios.append(pair[0] / max(pair[1], 1e-12))
    return statistics.median(ratios), statistics.median(ta), statistics.median(tb)


def cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated on the CPU while ``fn()`` runs, above what was live before it.

    What ``fn`` returns is dropped inside the profiled region only after the peak is reached,
    so a result that the caller keeps alive still counts.
    """
    from torch.autograd.profiler import profile

    with profile(profile_memory=True) as prof:
        out = fn()
        del out
    records = [
        e
        for e in prof.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    records.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in records:
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def cuda_peak_bytes(fn: Callable[[], Any], device: torch.device | str) -> int:
    """Peak bytes allocated on a CUDA device while ``fn()`` runs, above what was live before."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return max(int(peak), 0)


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device | str | None = None) -> int:
    """Peak bytes allocated while ``fn()`` runs, on ``device`` (CPU when None)."""
    if device is not None and torch.device(device).type == "cuda":
        return cuda_peak_bytes(fn, device)
    return cpu_peak_bytes(fn)


def cpu_model() -> str:
    """The CPU's marketing name (from /proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """What a reader needs to compare two benchmark runs."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "clock": _clock_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": command_line(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def command_line() -> str:
    """The command that ran this process, as it could be typed again from the repo root."""
    return shlex.join(["python", *sys.argv])


def write_csv(
    path: str | Path, rows: Iterable[Mapping[str, Any]], meta: Mapping[str, Any] | None = None
) -> Path:
    """Write ``rows`` (dicts; the header is the union of their keys in first-seen order).

    ``meta`` (machine info, command line) goes to a JSON file beside it, ``<name>.meta.json``,
    so that the CSV stays a plain table that any tool reads.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    header: list[str] = []
    for row in rows:
        header.extend(k for k in row if k not in header)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    if meta is not None:
        with open(path.with_suffix(".meta.json"), "w", encoding="utf-8") as f:
            json.dump(dict(meta), f, indent=2)
            f.write("\n")
    return path


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a CSV written by :func:`write_csv` (values as strings)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
