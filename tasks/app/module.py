"""The LightningModule every task derives from: the step of each split, its logging, the optimiser.

A task subclass builds its network, passes its metrics to ``__init__`` and implements
:meth:`DeclarativeTask.evaluate`; the backward mode of its declarative layers is not its
business: the runner sets ``ddn.backward_mode`` on the built module.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.utilities import rank_zero_info
from torchmetrics import MeanMetric, MetricCollection

from tasks.app.optim import configure as configure_optimization
from tasks.app.optim import continue_schedule


def arguments_of(fn: Callable[..., Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that name a parameter of ``fn``: a task's ``model`` section
    holds its network's arguments beside options of its own (loss weights, thresholds)."""
    names = inspect.signature(fn).parameters
    return {key: value for key, value in options.items() if key in names}


@dataclass
class Evaluation:
    """A batch's loss, and what the split's metrics are updated with: ``preds``, ``target``."""

    loss: torch.Tensor
    preds: torch.Tensor
    target: torch.Tensor
    size: int


class DeclarativeTask(pl.LightningModule, ABC):
    """Logs ``train/loss`` (per step, this rank), ``val/loss`` and ``test/loss`` (per epoch),
    and ``<split>/<name>`` (per epoch) for every metric of ``metrics``, one copy per split.

    Metrics and epoch losses are logged as torchmetrics objects, so under DDP Lightning
    reduces their states over the ranks once per epoch, not every step. ``progress_bar``: the
    metric name (without the split) shown in the progress bar. ``optim``: the run's ``optim``
    section as a plain dict.
    """

    progress_bar: str = ""

    def __init__(self, optim: dict[str, Any], metrics: MetricCollection) -> None:
        super().__init__()
        # Every subclass's arguments too; plain dicts, so checkpoints load without this
        # project's config classes (the loggers get the full run config from the harness).
        self.save_hyperparameters(ignore=["metrics"], logger=False)
        # One copy per split: their states must not mix.
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    @abstractmethod
    def evaluate(self, batch: Any, split: str) -> Evaluation:
        """The loss of ``batch`` and the inputs of the split's metrics."""

    def step(self, batch: Any, split: str) -> torch.Tensor:
        out = self.evaluate(batch, split)
        metrics = getattr(self, f"{split}_metrics")
        metrics.update(out.preds, out.target)
        self.log_metrics(metrics, out.size)
        if split == "train":
            self.log("train/loss", out.loss, on_step=True, on_epoch=False, prog_bar=True)
        else:
            mean_loss = getattr(self, f"{split}_loss")
            mean_loss.update(out.loss.detach(), weight=out.size)
            self.log(f"{split}/loss", mean_loss, on_step=False, on_epoch=True, batch_size=out.size)
        return out.loss

    def log_metrics(self, metrics: MetricCollection, size: int) -> None:
        # Logging the Metric objects (not their values) makes Lightning compute them once per
        # epoch, after reducing their states over the DDP ranks.
        for name, metric in metrics.items(keep_base=False):
            show = bool(self.progress_bar) and name.endswith(f"/{self.progress_bar}")
            self.log(name, metric, on_step=False, on_epoch=True, batch_size=size, prog_bar=show)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.step(batch, "test")

    def on_train_start(self) -> None:
        # After a resume the restored schedule meets the budget of this run (see optim.py).
        for config in self.trainer.lr_scheduler_configs:
            note = continue_schedule(config.scheduler, self.trainer.estimated_stepping_batches)
            if note is not None:
                rank_zero_info(f"Resuming: {note}")

    def configure_optimizers(self) -> dict[str, Any]:
        total = self.trainer.estimated_stepping_batches
        epochs = self.trainer.max_epochs or 0
        per_epoch = total / epochs if epochs > 0 else total
        return configure_optimization(
            self.parameters(), OmegaConf.create(self.hparams.optim), total, per_epoch
        )
