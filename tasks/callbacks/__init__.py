"""Lightning callbacks shared by every task."""

from tasks.callbacks.ddn_profiler import DDNProfiler

__all__ = ["DDNProfiler"]
