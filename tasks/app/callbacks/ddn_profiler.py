"""Per-layer time and memory of every declarative layer, logged every N training batches.

For each :class:`~ddn_layers.DeclarativeLayer` in the model (found by type, so every task gets
it for free) the callback logs, under ``ddn/<layer>/``:

- ``fwd_ms``, ``bwd_ms``: time of the layer's forward and of its backward (from the gradient
  reaching its output to the gradient leaving through its inputs). GPU: CUDA events on the
  current stream; CPU: wall time (``time.perf_counter_ns``).
- ``saved_mib``: memory the forward leaves allocated until the backward (saved tensors and the
  output): this is where ``unroll`` pays for its iterations.
- ``bwd_peak_mib``: ``saved_mib`` plus the most the backward allocates on top of what was live
  when it started: the memory the backward pass of this layer needs. GPU: the caching
  allocator's ``memory_allocated``/``max_memory_allocated`` (the peak counter is reset when
  the layer's backward starts). CPU: the torch profiler's allocation records (``[memory]``
  events of ``profile_memory=True``) between markers placed at the layer's boundaries, summed
  in time order; the peak is the maximum of that running sum. MiB = bytes / 1024 / 1024.
- ``iters_mean``, ``iters_max``, ``residual_max``, ``converged_frac``: the forward solver's
  record (``layer.last_info.summary()``).

On a CPU the times and the memory come from two consecutive batches: the torch profiler that
records the allocations slows what it records, unevenly across modes
(docs/benchmarks/matching_cpu.md), so the timed batch runs without it and the next batch runs
under it for the ``*_mib`` values only (both come from one batch when it is the run's last).
The record is logged at the step of the timed batch, the step its ``train/loss`` has.

Cost: on batches that are not profiled the callback only counts (no hooks are attached, nothing
is synchronised); ``every_n_steps=0`` switches it off. A profiled batch synchronises the device
once at its end. Under DDP every rank measures the same batches and rank zero logs its own
numbers (each rank runs the same layer on a same-sized shard, so they agree up to noise).
"""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler import record_function
from torch.utils.hooks import RemovableHandle

from ddn_layers import DeclarativeLayer
from tasks.app.layers import declarative_layers

MIB = 1024 * 1024
_PHASES = ("fwd", "bwd")


class DDNProfiler(pl.Callback):
    """Log time and memory of each declarative layer every ``every_n_steps`` training batches.

    ``memory=False`` skips the CPU memory measure (the torch profiler slows the batch it
    profiles); on GPU memory is always measured. ``history`` keeps every logged record.
    """

    def __init__(self, every_n_steps: int = 25, memory: bool = True) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
            raise ValueError(f"every_n_steps must be an integer >= 0, got {every_n_steps!r}")
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be an integer >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.memory = memory
        self.history: list[dict[str, float]] = []
        self._batches_seen = 0
        self._step: _ProfiledBatch | None = None
        self._memory_only = False  # the batch being profiled gives only the *_mib values
        self._step_at = 0  # trainer.global_step of the timed batch
        self._pending: tuple[int, dict[str, float]] | None = None  # times awaiting memory

    def state_dict(self) -> dict[str, int]:
        # a resumed run profiles the batches the uninterrupted run would have profiled
        return {"batches_seen": self._batches_seen}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._batches_seen = state_dict["batches_seen"]

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        seen = self._batches_seen
        self._batches_seen += 1
        if self.every_n_steps == 0:
            return
        if self._pending is None and seen % self.every_n_steps:
            return
        layers = declarative_layers(pl_module)
        if not layers:
            return
        device = pl_module.device
        if self._pending is not None:  # the batch after a timed one, under the CPU profiler
            self._memory_only = True
            self._step = _ProfiledBatch(layers, device, memory=True)
            return
        # the last batch of the run has no next one to measure memory on: both go there
        left = float(trainer.estimated_stepping_batches) - trainer.global_step
        split = self.memory and device.type != "cuda" and left > 1
        self._memory_only = False
        self._step_at = trainer.global_step
        self._step = _ProfiledBatch(layers, device, memory=self.memory and not split)
        if split:
            self._pending = (self._step_at, {})

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._step is None:
            return
        step, self._step = self._step, None
        metrics = step.finish()
        if self._memory_only:
            at, record = self._pending
            self._pending = None
            record.update({k: v for k, v in metrics.items() if k.endswith("_mib")})
            self._log(trainer, at, record)
        elif self._pending is not None:
            self._pending = (self._step_at, metrics)
        else:
            self._log(trainer, self._step_at, metrics)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # training ended right after a timed batch: its times go out without the memory
        if self._pending is not None:
            at, record = self._pending
            self._pending = None
            self._log(trainer, at, record)

    def _log(self, trainer: pl.Trainer, step: int, metrics: dict[str, float]) -> None:
        if not metrics:
            return
        self.history.append(metrics)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._step is not None:
            self._step.close()
            self._step = None
        self._pending = None

    def summary(self) -> dict[str, float]:
        """Median of each logged metric; the first record is dropped as warm-up when there
        are others (it pays for lazy initialisation and first allocations)."""
        records = self.history[1:] if len(self.history) > 1 else self.history
        keys = sorted({k for r in records for k in r})
        return {k: statistics.median(r[k] for r in records if k in r) for k in keys}


class _ProfiledBatch:
    """Hooks on every declarative layer for one training batch, and what they recorded."""

    def __init__(
        self, layers: list[tuple[str, DeclarativeLayer]], device: torch.device, memory: bool
    ) -> None:
        self.layers = {(name.replace(".", "_") or "model"): layer for name, layer in layers}
        self.cuda = device.type == "cuda"
        self.device = device
        # key -> phase -> list of (start, end) stamps, one pair per call of the layer
        self.stamps: dict[str, dict[str, list[list[Any]]]] = {
            k: {p: [] for p in _PHASES} for k in self.layers
        }
        # CUDA only: bytes live when a phase started, and what each phase measured
        self.live_at_start: dict[str, int] = {}
        self.saved_bytes: dict[str, int] = defaultdict(int)
        self.bwd_extra_bytes: dict[str, int] = defaultdict(int)
        self.open_ranges: dict[str, Any] = {}
        self.handles: list[RemovableHandle] = []
        self.profiler: torch.autograd.profiler.profile | None = None

        for key, layer in self.layers.items():
            self.handles += [
                layer.register_forward_pre_hook(self._hook(key, "fwd", start=True)),
                layer.register_forward_hook(self._hook(key, "fwd", start=False)),
                layer.register_full_backward_pre_hook(self._hook(key, "bwd", start=True)),
                layer.register_full_backward_hook(self._hook(key, "bwd", start=False)),
            ]
        if memory and not self.cuda:
            # Kineto prints a banner each time a profiler starts unless told otherwise.
            os.environ.setdefault("KINETO_LOG_LEVEL", "6")
            self.profiler = torch.autograd.profiler.profile(profile_memory=True)
            self.profiler.__enter__()

    def _hook(self, key: str, phase: str, start: bool) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            if start:
                self._start(key, phase)
            else:
                self._end(key, phase)

        return hook

    def _stamp(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter_ns()

    def _start(self, key: str, phase: str) -> None:
        if self.cuda:
            if phase == "bwd":
                torch.cuda.reset_peak_memory_stats(self.device)
            self.live_at_start[key] = torch.cuda.memory_allocated(self.device)
        elif self.profiler is not None:
            self.open_ranges[key] = record_function(f"ddn/{key}/{phase}").__enter__()
        self.stamps[key][phase].append([self._stamp(), None])

    def _end(self, key: str, phase: str) -> None:
        self.stamps[key][phase][-1][1] = self._stamp()
        if self.cuda:
            if phase == "fwd":
                live = torch.cuda.memory_allocated(self.device)
                self.saved_bytes[key] += live - self.live_at_start[key]
            else:
                peak = torch.cuda.max_memory_allocated(self.device)
                extra = peak - self.live_at_start[key]
                self.bwd_extra_bytes[key] = max(self.bwd_extra_bytes[key], extra)
        elif key in self.open_ranges:
            self.open_ranges.pop(key).__exit__(None, None, None)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for rf in self.open_ranges.values():
            rf.__exit__(None, None, None)
        self.open_ranges.clear()
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)

    def finish(self) -> dict[str, float]:
        self.close()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        if self.profiler is not None:
            self._read_cpu_memory(self.profiler)
        metrics: dict[str, float] = {}
        for key, layer in self.layers.items():
            prefix = f"ddn/{key}/"
            for phase in _PHASES:
                pairs = [p for p in self.stamps[key][phase] if p[1] is not None]
                if pairs:
                    metrics[f"{prefix}{phase}_ms"] = sum(self._elapsed_ms(a, b) for a, b in pairs)
            measured = self.cuda or self.profiler is not None
            if measured and self.stamps[key]["fwd"]:
                metrics[f"{prefix}saved_mib"] = self.saved_bytes[key] / MIB
            if measured and self.stamps[key]["bwd"]:
                peak = self.saved_bytes[key] + max(self.bwd_extra_bytes[key], 0)
                metrics[f"{prefix}bwd_peak_mib"] = peak / MIB
            if layer.last_info is not None:
                for name, value in layer.last_info.summary().items():
                    metrics[f"{prefix}{name}"] = value
        return metrics

    def _elapsed_ms(self, start: Any, end: Any) -> float:
        if self.cuda:
            return float(start.elapsed_time(end))
        return (end - start) / 1e6

    def _read_cpu_memory(self, profiler: torch.autograd.profiler.profile) -> None:
        events = profiler.kineto_results.events()
        allocations = sorted(
            (e.start_ns(), e.nbytes())
            for e in events
            if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
        )
        for e in events:
            parts = e.name().split("/")
            if len(parts) != 3 or parts[0] != "ddn" or parts[1] not in self.layers:
                continue
            key, phase = parts[1], parts[2]
            start, end = e.start_ns(), e.start_ns() + e.duration_ns()
            running, peak = 0, 0
            for t, nbytes in allocations:
                if start <= t <= end:
                    running += nbytes
                    peak = max(peak, running)
            if phase == "fwd":
                self.saved_bytes[key] += running
            else:
                self.bwd_extra_bytes[key] = max(self.bwd_extra_bytes[key], peak)
