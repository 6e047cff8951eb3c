"""Training samplers and the data position: every draw a function of (seed, epoch, index), and a
resume that skips what was consumed by index."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from tasks.app.callbacks import DataPosition
from tasks.app.data import SplitData
from tasks.app.sampling import EpochSampler, ItemKey, item_seed
from tasks.classification.config import DataConfig as ClassificationDataConfig
from tasks.classification.data import ClassificationData
from tasks.matching.config import DataConfig as MatchingDataConfig
from tasks.matching.data import MatchingData

DATA = list(range(10))


def indices(sampler: EpochSampler) -> list[int]:
    return [key.index for key in sampler]


def test_an_epoch_order_depends_on_the_seed_and_the_epoch_alone():
    a, b = EpochSampler(DATA, seed=1, shuffle=True), EpochSampler(DATA, seed=1, shuffle=True)
    torch.manual_seed(123)  # the global generator plays no part
    assert indices(a) == indices(b) and sorted(indices(a)) == DATA
    b.set_epoch(1)
    assert indices(a) != indices(b)
    assert indices(a) != indices(EpochSampler(DATA, seed=2, shuffle=True))
    assert indices(EpochSampler(DATA, seed=1, shuffle=False)) == DATA


def test_items_carry_the_seed_of_seed_epoch_and_index():
    sampler = EpochSampler(DATA, seed=4, shuffle=True)
    sampler.set_epoch(2)
    assert all(key.seed == item_seed(4, 2, key.index) for key in sampler)
    assert len({key.seed for key in sampler}) == len(DATA)


def test_processes_share_an_epoch_out_like_torch_distributed_sampler():
    ranks = [EpochSampler(DATA, seed=0, shuffle=True, num_replicas=3, rank=r) for r in range(3)]
    shares = [indices(r) for r in ranks]
    assert [len(s) for s in shares] == [4, 4, 4] == [len(r) for r in ranks]
    order = ranks[0].order()
    assert [order[i::3] for i in range(3)] == shares
    assert set(order) == set(DATA) and len(order) == 12  # padded with the order's first items


def test_a_resume_skips_the_consumed_items_of_its_epoch_only():
    whole = EpochSampler(DATA, seed=0, shuffle=True)
    whole.set_epoch(3)
    resumed = EpochSampler(DATA, seed=0, shuffle=True)
    resumed.resume(3, 4)
    assert list(resumed) == list(whole)[4:] and len(resumed) == len(DATA)
    resumed.set_epoch(4)
    whole.set_epoch(4)
    assert list(resumed) == list(whole)


def fitting(datamodule: SplitData, per_epoch: int, world: int) -> SimpleNamespace:
    """What the data position reads of a trainer."""
    return SimpleNamespace(
        state=SimpleNamespace(fn="fit"),
        num_training_batches=per_epoch,
        world_size=world,
        global_rank=0,
        datamodule=datamodule,
    )


def test_the_position_is_the_count_of_batches_trained_on():
    dm = SplitData(OmegaConf.create({"batch_size": 8, "num_workers": 0}))
    dm.splits["train"] = list(range(100))
    position = DataPosition()
    position.setup(fitting(dm, per_epoch=5, world=1), None, "fit")
    for _ in range(13):
        position.on_train_batch_end(None, None, None, None, 0)
    resumed = DataPosition()
    resumed.setup(fitting(dm, per_epoch=5, world=1), None, "fit")
    resumed.load_state_dict(position.state_dict())
    assert resumed.batches == 13 and dm._resume == {"epoch": 2, "batches": 3, "world_size": 1}
    sampler = dm.train_sampler(dm.splits["train"])
    assert (sampler.epoch, sampler.resume_epoch, sampler.resume_skip) == (2, 2, 24)


def test_a_mid_epoch_resume_on_another_process_count_says_it_will_differ():
    dm = SplitData(OmegaConf.create({"batch_size": 8, "num_workers": 0}))
    dm.splits["train"] = list(range(100))
    dm.resume_at(epoch=1, batches=3, world_size=2)
    dm.trainer = fitting(dm, per_epoch=5, world=2)
    assert dm.train_sampler(dm.splits["train"]).resume_skip == 24
    dm.trainer = fitting(dm, per_epoch=5, world=3)
    with pytest.warns(UserWarning, match="3 processes where the checkpoint was written by 2"):
        assert dm.train_sampler(dm.splits["train"]).resume_skip == 16


def test_training_items_of_both_tasks_are_fixed_by_their_key():
    key = ItemKey(5, item_seed(0, 1, 5))
    classification = ClassificationData(
        OmegaConf.merge(
            OmegaConf.structured(ClassificationDataConfig),
            {"augment": True, "corrupt": {"fraction": 0.3, "splits": ["train"]}},
        )
    )
    matching = MatchingData(OmegaConf.structured(MatchingDataConfig))
    for dm in (classification, matching):
        dm.setup()
        train = dm.splits["train"]
        first = train[key]
        torch.manual_seed(99)  # whatever the global generator holds
        again = train[key]
        other = train[ItemKey(5, item_seed(0, 2, 5))]  # the same item in the next epoch
        if isinstance(first, dict):
            first, again, other = first["kpts0"], again["kpts0"], other["kpts0"]
        else:
            first, again, other = first[0], again[0], other[0]
        assert torch.equal(first, again) and not torch.equal(first, other)
