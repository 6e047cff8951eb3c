"""Lightning callbacks shared by every task."""

from tasks.callbacks.ddn_profiler import DDNProfiler
from tasks.callbacks.step_timer import StepTimer

__all__ = ["DDNProfiler", "StepTimer"]
