"""LightningModule of the classification task: cross-entropy, accuracy per split."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from tasks.app.optim import configure as configure_optimization
from tasks.classification.model import Classifier


class ClassificationModule(pl.LightningModule):
    """Logs ``train/loss`` (per step, this rank), ``train/acc``, ``val/loss``, ``val/acc``,
    ``test/loss``, ``test/acc`` (per epoch). Accuracies and epoch losses are torchmetrics
    states, so under DDP they are reduced over all ranks once per epoch, not every step."""

    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any],
        num_classes: int,
        in_channels: int,
        backward_mode: str,
    ) -> None:
        super().__init__()
        # Plain dicts, so checkpoints load without this project's config classes; the loggers
        # get the full run config from the harness instead.
        self.save_hyperparameters(logger=False)
        self.net = Classifier(
            num_classes=num_classes,
            in_channels=in_channels,
            arch=model["arch"],
            width=model["width"],
            pool=model["pool"],
            penalty=model["penalty"],
            alpha=model["alpha"],
            backward_mode=backward_mode,
            pool_kwargs=model["pool_kwargs"],
            dropout=model["dropout"],
        )
        self.label_smoothing = model["label_smoothing"]
        # One metric object per split: their states must not mix.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        smoothing = self.label_smoothing if split == "train" else 0.0
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        acc = getattr(self, f"{split}_acc")
        acc.update(logits.detach(), y)
        self.log(f"{split}/acc", acc, on_step=False, on_epoch=True, prog_bar=True)
        if split == "train":
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        else:
            mean_loss = getattr(self, f"{split}_loss")
            mean_loss.update(loss.detach(), weight=len(y))
            self.log(f"{split}/loss", mean_loss, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        total = self.trainer.estimated_stepping_batches
        epochs = self.trainer.max_epochs or 0
        per_epoch = total / epochs if epochs > 0 else total
        return configure_optimization(
            self.parameters(), OmegaConf.create(self.hparams.optim), total, per_epoch
        )


def build_module(cfg: DictConfig, datamodule: pl.LightningDataModule) -> ClassificationModule:
    return ClassificationModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        num_classes=datamodule.num_classes,
        in_channels=datamodule.in_channels,
        backward_mode=cfg.ddn.backward_mode,
    )
