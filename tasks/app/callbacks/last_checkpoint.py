"""``last.ckpt``, rewritten every N epochs or every N optimiser steps, whatever the metrics did.

Lightning's own ``save_last`` writes ``last.ckpt`` only when the callback also saves a top-k
checkpoint, which a monitored metric that did not improve skips: ``ckpt=last`` would then go
back to the best epoch instead of the newest. This callback has no metric to wait for.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from tasks.app.rundir import LAST_CHECKPOINT


class LastCheckpoint(ModelCheckpoint):
    """Writes ``<dirpath>/last.ckpt`` every ``every_n_epochs`` epochs (at the end of the
    epoch's validation, or of its training when there is none) and when training ends or,
    given instead, every ``every_n_train_steps`` optimiser steps (except at a step that a
    validation or the epoch's end follows: the checkpoint after those comes instead)."""

    def __init__(
        self,
        dirpath: str,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=LAST_CHECKPOINT.removesuffix(ModelCheckpoint.FILE_EXTENSION),
            monitor=None,
            save_top_k=1,
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,
        )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # Not between a batch and the validation or epoch end that follows it: Lightning resumes
        # such a checkpoint by skipping that validation (the best checkpoint would miss its
        # score) and, at an epoch's end, counts epochs wrongly in what it saves afterwards. The
        # checkpoint written once they are done holds the same weights.
        if not _validation_or_epoch_end_follows(trainer, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Training that ends between saves (max_steps, a stop, the last epoch's batches after
        # its last validation) still leaves its final state in last.ckpt.
        if self._every_n_epochs >= 1 and not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


def _validation_or_epoch_end_follows(trainer: pl.Trainer, batch_idx: int) -> bool:
    if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
        return True
    if batch_idx + 1 >= trainer.num_training_batches:
        return True
    every = trainer.val_check_batch
    validating = trainer.enable_validation and every is not None and math.isfinite(every)
    return validating and (batch_idx + 1) % int(every) == 0
