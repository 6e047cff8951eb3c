"""The data module every task derives from: three splits and how they are loaded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset


class SplitData(pl.LightningDataModule):
    """A task's ``setup`` fills ``splits`` ("train", "val", "test" datasets); every loader
    reads ``batch_size`` and ``num_workers`` from the task's ``data`` section ``cfg``.

    ``collate_fn``: how a list of items becomes a batch (None: torch's default).
    """

    def __init__(
        self, cfg: DictConfig, collate_fn: Callable[[list[Any]], Any] | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.collate_fn = collate_fn
        self.splits: dict[str, Dataset] = {}

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.splits["train"])

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.splits["val"])

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.splits["test"])

    def loader(self, ds: Dataset, shuffle: bool = False, drop_last: bool = False) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(
            ds,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            collate_fn=self.collate_fn,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
