"""The profiling callback: what it measures, when, and that it leaves nothing behind."""

from __future__ import annotations

import csv
import statistics

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from ddn_layers import DeclarativeLayer, SolverInfo
from tasks.app.callbacks import DDNProfiler, ddn_profiler

SAVED = 1024 * 1024  # float32 elements the forward keeps for the backward: 4 MiB
SCRATCH = 2 * 1024 * 1024  # float32 elements the backward allocates on top: 8 MiB


class _Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(torch.ones(SAVED, device=x.device))
        return x.sum(-1)

    @staticmethod
    def backward(ctx, grad):
        scratch = torch.ones(SCRATCH, device=grad.device)
        scratch += 1
        del scratch
        return grad[:, None].expand(-1, 8).clone()


class KnownLayer(DeclarativeLayer):
    """A declarative layer whose memory use is known exactly."""

    def forward(self, x):
        n = x.shape[0]
        self.last_info = SolverInfo(
            iterations=torch.full((n,), 3),
            residual=torch.full((n,), 1e-7),
            converged=torch.ones(n, dtype=torch.bool),
        )
        return _Function.apply(x)


class TinyModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.ddn = KnownLayer()

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.ddn(self.lin(x)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(tmp_path, profiler: DDNProfiler, steps: int = 5) -> TinyModule:
    module = TinyModule()
    data = DataLoader(TensorDataset(torch.randn(4 * steps, 8)), batch_size=4)
    trainer = pl.Trainer(
        max_steps=steps,
        logger=CSVLogger(str(tmp_path), name="csv"),
        callbacks=[profiler],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
    )
    trainer.fit(module, data)
    return module


def test_a_short_run_times_five_steps_after_a_warm_up(tmp_path):
    # 8 batches: 0 warm-up, 1-5 timed, 6 under the memory profiler, 7 not measured
    profiler = DDNProfiler(every_n_steps=25, memory=True)
    module = fit(tmp_path, profiler, steps=8)
    summary = profiler.summary()
    for name in ("fwd_ms", "bwd_ms", "fwd_cpu_ms", "bwd_cpu_ms", "iters_mean"):
        stats = summary[f"ddn/ddn/{name}"]
        assert stats["n"] == 5, name
        assert 0 < stats["p25"] <= stats["median"] <= stats["p75"], name
        assert stats["median"] == statistics.median(profiler.samples[f"ddn/ddn/{name}"])
    mib = 4 / 1024 / 1024
    assert summary["ddn/ddn/saved_mib"]["median"] == pytest.approx(SAVED * mib, rel=0.01)
    peak = summary["ddn/ddn/bwd_peak_mib"]
    assert peak["median"] == pytest.approx((SAVED + SCRATCH) * mib, rel=0.01) and peak["n"] == 1
    # one record for the burst: the median of its five steps, with the memory batch's values
    (record,) = profiler.history
    assert record["ddn/ddn/fwd_ms"] == summary["ddn/ddn/fwd_ms"]["median"]
    assert record["ddn/ddn/iters_mean"] == 3 and record["ddn/ddn/converged_frac"] == 1
    assert profiler.shapes == {"ddn": [[4, 8]]}
    # the hooks are gone once the profiled batches are over
    layer = module.ddn
    assert not layer._forward_hooks and not layer._forward_pre_hooks
    assert not layer._backward_hooks and not layer._backward_pre_hooks
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    logged = [r for r in rows if r.get("ddn/ddn/fwd_ms")]
    # at the step of the burst's last timed batch
    assert [int(r["step"]) for r in logged] == [5]
    assert float(logged[0]["ddn/ddn/bwd_peak_mib"]) == pytest.approx(peak["median"])


def test_cpu_times_are_taken_without_the_memory_profiler(tmp_path, monkeypatch):
    """The profiler that records allocations slows what it records: on a CPU the timed batches
    run without it, and the batch after a burst measures memory under it."""
    flags = []
    real = ddn_profiler._ProfiledBatch

    def spy(layers, device, memory):
        flags.append(memory)
        return real(layers, device, memory)

    monkeypatch.setattr(ddn_profiler, "_ProfiledBatch", spy)
    profiler = DDNProfiler(every_n_steps=7, memory=True)
    fit(tmp_path, profiler, steps=14)
    # warm-up (both), 1-5 timed, 6 memory; the next burst at batch 7: 7-11, 12; 13 nothing
    assert flags == [True] + [False] * 5 + [True] + [False] * 5 + [True]
    assert len(profiler.history) == 2
    assert profiler.summary()["ddn/ddn/bwd_ms"]["n"] == 10
    for record in profiler.history:
        assert record["ddn/ddn/bwd_ms"] > 0 and record["ddn/ddn/bwd_peak_mib"] > 0


def test_timing_only(tmp_path):
    profiler = DDNProfiler(every_n_steps=1, memory=False)
    fit(tmp_path, profiler, steps=3)
    # a burst cut short by the end of training counts with the steps it timed
    summary = profiler.summary()
    assert summary["ddn/ddn/bwd_ms"]["n"] == 2 and len(profiler.history) == 1
    assert not any(k.endswith("_mib") for k in summary)


def test_a_run_too_short_for_a_burst_falls_back_on_the_warm_up(tmp_path):
    profiler = DDNProfiler(every_n_steps=25, memory=True)
    fit(tmp_path, profiler, steps=1)
    summary = profiler.summary()
    assert summary["ddn/ddn/bwd_ms"]["n"] == 1 and summary["ddn/ddn/bwd_peak_mib"]["n"] == 1
    assert profiler.history and profiler.history[0]["ddn/ddn/bwd_ms"] > 0


def test_switched_off_attaches_nothing(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a batch was profiled with every_n_steps=0")

    monkeypatch.setattr(ddn_profiler, "_ProfiledBatch", refuse)
    profiler = DDNProfiler(every_n_steps=0)
    fit(tmp_path, profiler, steps=3)
    assert profiler.history == [] and profiler.summary() == {}


def test_hooks_removed_when_the_step_fails(tmp_path):
    class Boom(TinyModule):
        def training_step(self, batch, batch_idx):
            self.ddn(self.lin(batch[0]))
            raise RuntimeError("boom")

    profiler = DDNProfiler(every_n_steps=1)
    module = Boom()
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        callbacks=[profiler],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, DataLoader(TensorDataset(torch.randn(4, 8)), batch_size=4))
    assert not module.ddn._forward_hooks and not module.ddn._backward_hooks
    assert not torch._C._autograd._profiler_enabled()  # the CPU memory profiler was stopped


def test_a_resumed_run_keeps_the_steps_timed_before_and_warms_up_again(tmp_path):
    profiler = DDNProfiler(every_n_steps=25, memory=False)
    fit(tmp_path / "first", profiler, steps=7)
    resumed = DDNProfiler(every_n_steps=25, memory=False)
    resumed.load_state_dict(profiler.state_dict())
    assert resumed._batches_seen == 7 and not resumed._warm
    fit(tmp_path / "second", resumed, steps=7)
    assert resumed.summary()["ddn/ddn/fwd_ms"]["n"] == 10


def test_bad_interval():
    with pytest.raises(ValueError, match="every_n_steps"):
        DDNProfiler(every_n_steps=-1)
    with pytest.raises(ValueError, match="every_n_steps"):
        DDNProfiler(every_n_steps=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_events_and_allocator_peak():
    layer = KnownLayer().cuda()
    lin = torch.nn.Linear(8, 8).cuda()
    x = torch.randn(4, 8, device="cuda")
    batch = ddn_profiler._ProfiledBatch([("ddn", layer)], torch.device("cuda"), memory=True)
    layer(lin(x)).sum().backward()
    record = batch.finish()
    mib = 4 / 1024 / 1024
    assert record["ddn/ddn/saved_mib"] == pytest.approx(SAVED * mib, rel=0.05)
    assert record["ddn/ddn/bwd_peak_mib"] == pytest.approx((SAVED + SCRATCH) * mib, rel=0.05)
    assert record["ddn/ddn/fwd_ms"] > 0 and record["ddn/ddn/bwd_ms"] > 0
