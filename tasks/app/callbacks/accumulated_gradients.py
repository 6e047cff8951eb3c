"""Gradients accumulated part-way through a window of ``trainer.accumulate_grad_batches``.

A checkpoint written inside such a window (by a validation that falls inside it) would lose the
gradients of the window's first batches: Lightning does not save gradients, and a resume runs
only the window's remaining batches before the optimiser step. This callback saves every
process's accumulated gradients with such a checkpoint and puts them back before the first
resumed batch. Checkpoints at optimiser steps carry nothing extra.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn

from tasks.app.distributed import gather, mine


class AccumulatedGradients(pl.Callback):
    """Save the gradients of a cut accumulation window with the checkpoint; restore them."""

    def __init__(self) -> None:
        self._trainer: pl.Trainer | None = None
        self._pending: list[torch.Tensor | None] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        # the same answer on every process, so that all of them take part in gather or none
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        # Lightning's own test of "this batch does not end a window" (no public equivalent)
        if not trainer.fit_loop._should_accumulate():
            return {}
        grads = [_cpu(p.grad) for p in trainer.lightning_module.parameters()]
        return {"ranks": gather(grads)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = mine(state_dict["ranks"], "accumulated gradients")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is None:
            return
        for param, grad in zip(pl_module.parameters(), self._pending, strict=True):
            param.grad = None if grad is None else grad.to(param.device)
        self._pending = None


def _cpu(grad: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None else grad.detach().cpu()
