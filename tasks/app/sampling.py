"""Training samplers whose every draw is a function of (run seed, epoch, index) alone.

A resumed run must see the batches the uninterrupted run would have seen, in the same order and
with the same random content. Nothing here carries a random state from batch to batch: epoch
``e``'s order is a permutation seeded by ``(seed, e)``, and each item's own draws (augmentation,
corruption, a generated pair) are seeded by ``(seed, e, index)``, which the sampler hands to
the dataset in an :class:`ItemKey`. So the position in the data is two numbers, the epoch and
the samples already consumed in it, and a resume skips those by index without drawing them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DistributedSampler


class ItemKey(NamedTuple):
    """What a training sampler yields: the dataset index, and the seed of that item's draws."""

    index: int
    seed: int


def item_seed(*keys: int) -> int:
    """A 63-bit seed from non-negative integers; distinct tuples give independent streams."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def split_key(key: int | ItemKey) -> tuple[int, int | None]:
    """``(index, seed)`` of what a sampler yielded; a plain index has no seed of its own."""
    if isinstance(key, ItemKey):
        return key.index, key.seed
    return int(key), None


class EpochSampler(DistributedSampler):
    """Each process's share of epoch ``epoch``, as :class:`ItemKey` s.

    The epoch's order is ``randperm`` seeded by ``(seed, epoch)`` (or the identity when
    ``shuffle`` is false), padded to a multiple of ``num_replicas`` and dealt out like torch's
    ``DistributedSampler`` (rank ``r`` takes positions ``r, r + W, ...``). It derives from that
    class so that Lightning uses it as it is instead of wrapping it in one of its own.

    :meth:`resume` makes the iterator of epoch ``epoch`` start after ``skip`` items of this
    process's share; iterators of other epochs start at their beginning.
    """

    def __init__(
        self, dataset: Sized, seed: int, shuffle: bool, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.resume_epoch = -1
        self.resume_skip = 0

    def resume(self, epoch: int, skip: int) -> None:
        self.set_epoch(epoch)
        self.resume_epoch = epoch
        self.resume_skip = skip

    def order(self) -> list[int]:
        """Every process's items of this epoch, in order, padded to ``total_size``."""
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        pad = self.total_size - n
        if pad > 0:
            order += (order * math.ceil(pad / n))[:pad]
        return order

    def __iter__(self) -> Iterator[ItemKey]:
        mine = self.order()[self.rank : self.total_size : self.num_replicas]
        skip = self.resume_skip if self.epoch == self.resume_epoch else 0
        for index in mine[skip:]:
            yield ItemKey(index, item_seed(self.seed, self.epoch, index))
