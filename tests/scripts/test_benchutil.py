"""The benchmark helpers measure what they claim, checked on allocations of known size."""

from __future__ import annotations

import json
import time

import pytest
import torch

from scripts import benchutil


def _allocate(nbytes: int) -> torch.Tensor:
    t = torch.empty(nbytes // 4, dtype=torch.float32)
    t.fill_(1.0)  # touch it, so that nothing lazy hides the allocation
    return t


@pytest.mark.parametrize("mib", [1, 4, 16])
def test_cpu_peak_reports_a_known_allocation(mib):
    peak = benchutil.cpu_peak_bytes(lambda: _allocate(mib * benchutil.MIB))
    # small bookkeeping allocations of the profiler itself are allowed, nothing more
    assert mib * benchutil.MIB <= peak < mib * benchutil.MIB + 64 * 1024


def test_cpu_peak_is_the_maximum_not_the_sum():
    def two_in_turn():
        a = _allocate(4 * benchutil.MIB)
        del a
        b = _allocate(4 * benchutil.MIB)
        return b

    def two_at_once():
        a = _allocate(4 * benchutil.MIB)
        b = _allocate(4 * benchutil.MIB)
        return a, b

    assert benchutil.cpu_peak_bytes(two_in_turn) < 5 * benchutil.MIB
    assert benchutil.cpu_peak_bytes(two_at_once) >= 8 * benchutil.MIB


def test_cpu_peak_ignores_memory_live_before_the_call():
    kept = _allocate(8 * benchutil.MIB)
    peak = benchutil.cpu_peak_bytes(lambda: kept.sum())
    assert peak < 64 * 1024


def test_time_callable_counts_repeats_and_passes_setup():
    calls = []
    t = benchutil.time_callable(calls.append, repeats=3, warmup=2, setup=lambda: "graph")
    assert len(t.times) == 3 and calls == ["graph"] * 5
    assert t.min <= t.median and all(s >= 0 for s in t.times)
    with pytest.raises(ValueError, match="repeats"):
        benchutil.time_callable(lambda: None, repeats=0)


def test_time_within_fits_the_budget():
    calls = []
    t = benchutil.time_within(lambda: calls.append(1), budget_s=0.01, max_repeats=4)
    # one discarded warm-up call, one that sets the count, then the timed repeats
    assert 1 <= len(t.times) <= 4 and len(calls) == len(t.times) + 2

    def slow():
        calls.append(2)
        time.sleep(0.02)

    calls.clear()
    t = benchutil.time_within(slow, budget_s=0.01)
    assert len(t.times) == 1 and calls == [2, 2] and t.median >= 0.02


def test_write_csv_writes_header_union_and_meta(tmp_path):
    path = benchutil.write_csv(
        tmp_path / "out" / "r.csv",
        [{"a": 1, "b": 2}, {"a": 3, "c": 4}],
        meta=benchutil.machine_info(),
    )
    rows = benchutil.read_csv(path)
    assert rows == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "", "c": "4"}]
    meta = json.loads(path.with_suffix(".meta.json").read_text())
    assert meta["torch"] == torch.__version__ and meta["command"].startswith("python")
    assert meta["torch_threads"] >= 1 and meta["cpu"]


def test_cpu_clock_counts_this_threads_work_not_sleep():
    """The cpu clock reads thread CPU time on one torch thread: a sleep costs nothing on it."""
    threads = torch.get_num_threads()
    try:
        benchutil.use_clock("cpu")
        assert torch.get_num_threads() == 1 and benchutil.clock_name() == "cpu"
        assert benchutil.time_callable(lambda: time.sleep(0.05), repeats=1).median < 0.02
        benchutil.use_clock("wall")
        assert benchutil.time_callable(lambda: time.sleep(0.05), repeats=1).median >= 0.05
        with pytest.raises(ValueError, match="clock"):
            benchutil.use_clock("gpu")
    finally:
        benchutil.use_clock("wall")
        torch.set_num_threads(threads)


def test_paired_ratio_times_both_sides_every_round():
    calls = {"a": 0, "b": 0, "setup": 0}

    def setup():
        calls["setup"] += 1
        return 3

    def a(x):
        calls["a"] += x

    def b():
        calls["b"] += 1

    ratio, ta, tb = benchutil.paired_ratio(a, b, rounds=5, setup_a=setup)
    # one warm-up round, then five timed; the setup output reaches a every time
    assert calls == {"a": 18, "b": 6, "setup": 6}
    assert ratio > 0 and ta > 0 and tb > 0
