"""Per-layer time and memory of every declarative layer, measured on bursts of training batches.

For each :class:`~ddn_layers.DeclarativeLayer` in the model (found by type, so every task gets
it for free) the callback measures, under ``ddn/<layer>/``:

- ``fwd_ms``, ``bwd_ms``: time of the layer's forward and of its backward (from the gradient
  reaching its output to the gradient leaving through its inputs). GPU: CUDA events on the
  current stream; CPU: wall time (``time.perf_counter_ns``), and beside it ``fwd_cpu_ms``,
  ``bwd_cpu_ms``: the CPU time of the thread that runs the layer (``time.thread_time_ns``),
  which a busy machine does not inflate as it does wall time (work that torch hands to its
  other intra-op threads is not in it).
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

When: the first batch of every process (a fresh run or a resumed one) is a warm-up, measured
and set aside (it pays for lazy initialisation and first allocations); then a burst of
``TIMED_STEPS`` consecutive batches is timed, and a new burst starts every ``every_n_steps``
batches (``every_n_steps=0``: never, and nothing is hooked). Each burst logs one record: the
median of its batches' times and solver statistics, at the step of its last timed batch. On a
CPU the torch profiler that records the allocations slows what it records, unevenly across
modes (docs/benchmarks/matching_cpu.md), so the timed batches run without it and the batch after
the burst runs under it for the ``*_mib`` values only.

:meth:`DDNProfiler.summary` gives, for every metric, the median, quartiles and count over all
the timed batches of the run (memory: over the memory batches), so that a figure says how many
steps it rests on and how much they spread; a run too short for any burst falls back on the
warm-up batch (``n`` = 1 says so).

Cost: batches outside the warm-up and the bursts are only counted (no hooks, no
synchronisation). A profiled batch synchronises the device once at its end. Under DDP every
rank measures the same batches and rank zero logs its own numbers (each rank runs the same layer
on a same-sized shard, so they agree up to noise).
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
from tasks.app.quiet import CppNoteFilter
from tasks.app.stats import spread

MIB = 1024 * 1024
_PHASES = ("fwd", "bwd")
# Consecutive batches timed per burst: enough for a median that one slow batch cannot move.
TIMED_STEPS = 5
_TIME, _MEMORY, _WARMUP = "time", "memory", "warmup"


class DDNProfiler(pl.Callback):
    """Measure each declarative layer on a warm-up batch, then on bursts of ``TIMED_STEPS``
    batches every ``every_n_steps`` training batches.

    ``memory=False`` skips the CPU memory measure (the torch profiler slows the batch it
    profiles); on GPU memory is always measured. ``history`` keeps every logged record,
    ``samples`` every timed batch's value of every metric, ``shapes`` each layer's input shapes.
    """

    def __init__(self, every_n_steps: int = 25, memory: bool = True) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
            raise ValueError(f"every_n_steps must be an integer >= 0, got {every_n_steps!r}")
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be an integer >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.memory = memory
        self.history: list[dict[str, float]] = []
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.shapes: dict[str, list[list[int]]] = {}
        self._batches_seen = 0
        self._warm = False  # this process has run its warm-up batch
        self._warmup: dict[str, float] = {}
        self._plan: list[str] = []  # what the next batches of the current burst are for
        self._burst: list[dict[str, float]] = []  # records of the burst's timed batches
        self._burst_step = 0
        self._step: _ProfiledBatch | None = None
        self._kind = ""

    def state_dict(self) -> dict[str, Any]:
        # a resumed run's summary covers the steps timed before it was stopped
        return {"batches_seen": self._batches_seen, "samples": dict(self.samples)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._batches_seen = state_dict["batches_seen"]
        self.samples = defaultdict(
            list, {k: list(v) for k, v in state_dict.get("samples", {}).items()}
        )

    def _burst_plan(self, device: torch.device) -> list[str]:
        split = self.memory and device.type != "cuda"
        return [_TIME] * TIMED_STEPS + ([_MEMORY] if split else [])

    def _next_kind(self, seen: int, device: torch.device) -> str:
        if not self._warm:
            return _WARMUP
        if not self._plan and seen % max(self.every_n_steps, len(self._burst_plan(device))) == 0:
            self._plan = self._burst_plan(device)
        return self._plan.pop(0) if self._plan else ""

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        seen = self._batches_seen
        self._batches_seen += 1
        if self.every_n_steps == 0:
            return
        device = pl_module.device
        kind = self._next_kind(seen, device)
        if not kind:
            return
        layers = declarative_layers(pl_module)
        if not layers:
            self._warm, self._plan = True, []
            return
        self._kind = kind
        if kind == _TIME:
            self._burst_step = trainer.global_step
        # on GPU the allocator measures memory on every batch; _ProfiledBatch ignores the flag
        self._step = _ProfiledBatch(layers, device, memory=self.memory and kind != _TIME)

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
        if self._kind == _WARMUP:
            self._warm, self._warmup = True, metrics
            self.shapes = step.shapes
            self._plan = self._burst_plan(pl_module.device)
            return
        if self._kind == _TIME:
            self._burst.append(metrics)
            if self._plan:  # more timed batches, or the memory batch, to come
                return
            memory: dict[str, float] = {}
        else:
            memory = {k: v for k, v in metrics.items() if k.endswith("_mib")}
        self._end_burst(trainer, memory)

    def _end_burst(self, trainer: pl.Trainer, memory: dict[str, float]) -> None:
        burst, self._burst = self._burst, []
        for record in burst:
            for key, value in record.items():
                self.samples[key].append(value)
        for key, value in memory.items():
            self.samples[key].append(value)
        keys = sorted({k for r in burst for k in r})
        logged = {k: statistics.median(r[k] for r in burst if k in r) for k in keys}
        self._log(trainer, self._burst_step, {**logged, **memory})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a burst cut short by the end of training still counts, with the batches it timed
        if self._burst:
            self._end_burst(trainer, {})
        self._plan = []
        # what no burst measured (a run of a batch or two) comes from the warm-up batch
        missing = {k: v for k, v in self._warmup.items() if k not in self.samples}
        if missing:
            for key, value in missing.items():
                self.samples[key].append(value)
            self._log(trainer, trainer.global_step, missing)

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
        self._plan, self._burst = [], []

    def summary(self) -> dict[str, dict[str, float | int]]:
        """``{metric: {"median", "p25", "p75", "n"}}`` over every timed batch of the run."""
        return {k: spread(v) for k, v in sorted(self.samples.items()) if v}


class _ProfiledBatch:
    """Hooks on every declarative layer for one training batch, and what they recorded."""

    def __init__(
        self, layers: list[tuple[str, DeclarativeLayer]], device: torch.device, memory: bool
    ) -> None:
        self.layers = {(name.replace(".", "_") or "model"): layer for name, layer in layers}
        self.cuda = device.type == "cuda"
        self.device = device
        # key -> phase -> list of (start, end) stamps, one pair per call of the layer; on a
        # CPU each stamp is (wall ns, thread CPU ns)
        self.stamps: dict[str, dict[str, list[list[Any]]]] = {
            k: {p: [] for p in _PHASES} for k in self.layers
        }
        self.shapes: dict[str, list[list[int]]] = {}  # key -> shapes of the first call's inputs
        # CUDA only: bytes live when a phase started, and what each phase measured
        self.live_at_start: dict[str, int] = {}
        self.saved_bytes: dict[str, int] = defaultdict(int)
        self.bwd_extra_bytes: dict[str, int] = defaultdict(int)
        self.open_ranges: dict[str, Any] = {}
        self.handles: list[RemovableHandle] = []
        self.profiler: torch.autograd.profiler.profile | None = None
        self.notes: CppNoteFilter | None = None

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
            # the profiler notes every free of a block allocated before it started
            self.notes = CppNoteFilter().__enter__()
            self.profiler = torch.autograd.profiler.profile(profile_memory=True)
            self.profiler.__enter__()

    def _hook(self, key: str, phase: str, start: bool) -> Callable[..., None]:
        def hook(module: Any, inputs: Any, *_: Any) -> None:
            if phase == "fwd" and start and key not in self.shapes:
                self.shapes[key] = [list(x.shape) for x in inputs if isinstance(x, torch.Tensor)]
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
        return time.perf_counter_ns(), time.thread_time_ns()

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
        if self.notes is not None:
            self.notes.__exit__(None, None, None)
            self.notes = None

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
                if not pairs:
                    continue
                if self.cuda:
                    metrics[f"{prefix}{phase}_ms"] = sum(float(a.elapsed_time(b)) for a, b in pairs)
                else:
                    metrics[f"{prefix}{phase}_ms"] = sum(b[0] - a[0] for a, b in pairs) / 1e6
                    metrics[f"{prefix}{phase}_cpu_ms"] = sum(b[1] - a[1] for a, b in pairs) / 1e6
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
