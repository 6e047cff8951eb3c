"""The data module every task derives from: three splits, how they are loaded, and where the
training data starts (a resume continues with the next batch)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler

from tasks.app.sampling import EpochSampler


class SplitData(pl.LightningDataModule):
    """A task's ``setup`` fills ``splits`` ("train", "val", "test" datasets); every loader
    reads ``batch_size`` and ``num_workers`` from the task's ``data`` section ``cfg``.

    The training split is read through an :class:`~tasks.app.sampling.EpochSampler` seeded by
    the run's ``seed`` (shuffled unless ``shuffle_train`` is false), so its datasets receive
    :class:`~tasks.app.sampling.ItemKey` s and seed each item's random draws from them.
    ``collate_fn``: how a list of items becomes a batch (None: torch's default).
    """

    shuffle_train = True

    def __init__(
        self, cfg: DictConfig, seed: int = 0, collate_fn: Callable[[list[Any]], Any] | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.collate_fn = collate_fn
        self.splits: dict[str, Dataset] = {}
        self._resume: dict[str, int] = {}

    def train_dataloader(self) -> DataLoader:
        train = self.splits["train"]
        sampler = self.train_sampler(train)
        return self.loader(train, sampler=sampler, drop_last=self.drop_last(train))

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.splits["val"])

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.splits["test"])

    def drop_last(self, train: Dataset) -> bool:
        """Whether the training loader drops a last, smaller batch."""
        return False

    def train_sampler(self, train: Dataset) -> EpochSampler:
        world, rank = 1, 0
        if self.trainer is not None:
            world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = EpochSampler(train, self.seed, self.shuffle_train, world, rank)
        if self._resume:
            sampler.resume(self._resume["epoch"], self._skip(world))
        return sampler

    def loader(
        self, ds: Dataset, sampler: Sampler | None = None, drop_last: bool = False
    ) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(
            ds,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            collate_fn=self.collate_fn,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            # the loader draws its workers' base seed from here, not from the global generator
            # whose stream the model's own draws (dropout) must keep
            generator=torch.Generator().manual_seed(self.seed),
        )

    def resume_at(self, epoch: int, batches: int, world_size: int) -> None:
        """Start the training data after ``batches`` batches of epoch ``epoch``, trained on by
        ``world_size`` processes (see tasks/app/callbacks/data_position.py)."""
        self._resume = {"epoch": epoch, "batches": batches, "world_size": world_size}

    def _skip(self, world: int) -> int:
        """Items of this process's share of the resumed epoch already trained on: the first
        ``batches * batch_size * world_size`` of the epoch's order, dealt out to ``world``."""
        saved_world = self._resume["world_size"]
        samples = self._resume["batches"] * self.cfg.batch_size * saved_world
        if samples and (saved_world != world or samples % world):
            warnings.warn(
                f"resuming mid-epoch with {world} processes where the checkpoint was written by "
                f"{saved_world}: the rest of the epoch is dealt out anew, so the run will not "
                "match an uninterrupted one",
                stacklevel=2,
            )
        return samples // world
