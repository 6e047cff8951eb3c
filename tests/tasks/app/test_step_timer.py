"""The training-step timer: one time per batch, a median per epoch, the run's median."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from tasks.app.callbacks import StepTimer
from tasks.app.callbacks.step_timer import METRIC


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.lin(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_step_timer_logs_each_epoch_and_summarises(tmp_path):
    timer = StepTimer()
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    data = DataLoader(TensorDataset(torch.randn(12, 4)), batch_size=4)
    trainer.fit(_Tiny(), data)
    assert len(timer.times_ms) == 6 and all(t > 0 for t in timer.times_ms)
    assert trainer.callback_metrics[METRIC] > 0
    summary = timer.summary()
    assert set(summary) == {METRIC} and summary[METRIC]["n"] == 5  # the first step left out
    assert 0 < summary[METRIC]["p25"] <= summary[METRIC]["median"] <= summary[METRIC]["p75"]
    assert StepTimer().summary() == {}
