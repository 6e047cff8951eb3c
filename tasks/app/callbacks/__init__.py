"""Lightning callbacks shared by every task."""

from tasks.app.callbacks.accumulated_gradients import AccumulatedGradients
from tasks.app.callbacks.data_position import DataPosition
from tasks.app.callbacks.ddn_profiler import DDNProfiler
from tasks.app.callbacks.last_checkpoint import LastCheckpoint
from tasks.app.callbacks.random_states import RandomStates
from tasks.app.callbacks.step_timer import StepTimer

__all__ = [
    "AccumulatedGradients",
    "DataPosition",
    "DDNProfiler",
    "LastCheckpoint",
    "RandomStates",
    "StepTimer",
]
