"""Wall time of each training step (forward, backward and optimiser step of one batch).

Measured from ``on_train_batch_start`` to ``on_train_batch_end`` (data loading excluded; on
GPU the device is synchronised at both ends, so the time is the batch's and not its launch's).
Each epoch logs the median over its batches as ``time/train_step_ms`` (under DDP, averaged over
the ranks); ``summary()`` gives the median, quartiles and count over the whole run (the first
batch, which pays for lazy initialisation, left out).
Batches the DDN profiler measures are slower; the median keeps them from moving the number.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch

from tasks.app.stats import spread

METRIC = "time/train_step_ms"


class StepTimer(pl.Callback):
    metric = METRIC

    def __init__(self) -> None:
        self.times_ms: list[float] = []
        self._epoch: list[float] = []
        self._start: int | None = None

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any
    ) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter_ns()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any
    ) -> None:
        if self._start is None:
            return
        self._sync(pl_module)
        ms = (time.perf_counter_ns() - self._start) / 1e6
        self._start = None
        self.times_ms.append(ms)
        self._epoch.append(ms)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch:
            # under DDP: the mean over the ranks of each rank's median (one reduction an epoch)
            pl_module.log(METRIC, statistics.median(self._epoch), sync_dist=True)
        self._epoch = []

    def summary(self) -> dict[str, dict[str, float | int]]:
        """``{"time/train_step_ms": {"median", "p25", "p75", "n"}}`` over the run's steps
        (empty before any step)."""
        times = self.times_ms[1:] if len(self.times_ms) > 1 else self.times_ms
        return {METRIC: spread(times)} if times else {}
