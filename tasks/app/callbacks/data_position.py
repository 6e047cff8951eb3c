"""Where a run stands in its training data, saved in every checkpoint and handed back on resume.

The count of training batches trained on since the run began is the whole position: epochs all
have ``trainer.num_training_batches`` batches, so the next batch is batch ``count % per_epoch``
of epoch ``count // per_epoch``. Counting here, rather than reading Lightning's loop counters,
keeps the position right through resumes of resumed runs, where those counters' epoch
bookkeeping is not kept the way a fresh run keeps it.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn

from tasks.app.data import SplitData


class DataPosition(pl.Callback):
    """Count training batches; on resume, tell the :class:`SplitData` where to start."""

    def __init__(self) -> None:
        self.batches = 0
        self._trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # Lightning calls the checkpoint callbacks' hooks after every other callback's, so a
        # checkpoint written at the end of this batch counts it.
        self.batches += 1

    def state_dict(self) -> dict[str, int]:
        trainer = self._trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        per_epoch = trainer.num_training_batches
        if not math.isfinite(per_epoch):
            return {}
        world = trainer.world_size
        return {"batches": self.batches, "per_epoch": int(per_epoch), "world_size": world}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.batches = state_dict["batches"]
        epoch, batches = divmod(self.batches, state_dict["per_epoch"])
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if isinstance(datamodule, SplitData):
            datamodule.resume_at(epoch, batches, state_dict["world_size"])
