"""LightningModule of the classification task: cross-entropy, accuracy per split."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from tasks.app.module import DeclarativeTask, Evaluation, arguments_of
from tasks.classification.model import Classifier


class ClassificationModule(DeclarativeTask):
    """Logs ``<split>/acc`` for train, val and test, and the losses (see DeclarativeTask)."""

    progress_bar = "acc"

    def __init__(
        self, model: dict[str, Any], optim: dict[str, Any], num_classes: int, in_channels: int
    ) -> None:
        accuracy = MulticlassAccuracy(num_classes, average="micro")
        super().__init__(optim, MetricCollection({"acc": accuracy}))
        self.net = Classifier(num_classes, in_channels, **arguments_of(Classifier, model))
        self.label_smoothing = model["label_smoothing"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> Evaluation:
        x, y = batch
        logits = self(x)
        smoothing = self.label_smoothing if split == "train" else 0.0
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        return Evaluation(loss, logits.detach(), y, len(y))


def build_module(cfg: DictConfig, datamodule: pl.LightningDataModule) -> ClassificationModule:
    return ClassificationModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        num_classes=datamodule.num_classes,
        in_channels=datamodule.in_channels,
    )
