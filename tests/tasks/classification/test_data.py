"""Data modules: fixed, disjoint, stratified splits; shapes; corruption only where asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tasks.classification.config import DataConfig
from tasks.classification.data import ClassificationData, _stratified_split


def data_cfg(**overrides):
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), overrides)
    return cfg


def make_image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 12) -> Path:
    """A folder tree root/<class>/<i>.png of random RGB images, brighter for higher classes."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (size, size, 3)) + 80 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


def test_stratified_split_is_fixed_disjoint_and_complete():
    labels = np.repeat(np.arange(5), 40)
    a = _stratified_split(labels, 0.1, 0.2, seed=0)
    b = _stratified_split(labels, 0.1, 0.2, seed=0)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert [len(a[s]) for s in ("train", "val", "test")] == [140, 20, 40]
    assert np.array_equal(np.sort(np.concatenate(list(a.values()))), np.arange(200))
    assert np.bincount(labels[a["test"]]).tolist() == [8] * 5
    c = _stratified_split(labels, 0.1, 0.2, seed=1)
    assert not np.array_equal(a["test"], c["test"])


def test_digits():
    dm = ClassificationData(data_cfg())
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 16)
    dm.setup()
    sizes = {s: len(d) for s, d in dm.splits.items()}
    assert sizes == {"train": 1257, "val": 180, "test": 360}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 16, 16) and y.dtype == torch.int64
    # normalised with the training split's statistics
    images = torch.stack([dm.splits["train"][i][0] for i in range(len(dm.splits["train"]))])
    assert abs(images.mean().item()) < 1e-3 and abs(images.std().item() - 1) < 1e-2


def test_corruption_only_on_chosen_splits_and_fixed_for_evaluation():
    clean = ClassificationData(data_cfg())
    dirty = ClassificationData(data_cfg(corrupt={"fraction": 0.3, "splits": ["test"]}))
    clean.setup()
    dirty.setup()
    assert torch.equal(clean.splits["train"][0][0], dirty.splits["train"][0][0])
    assert not torch.equal(clean.splits["test"][0][0], dirty.splits["test"][0][0])
    again = ClassificationData(data_cfg(corrupt={"fraction": 0.3, "splits": ["test"]}))
    again.setup()
    assert torch.equal(dirty.splits["test"][3][0], again.splits["test"][3][0])


def test_training_corruption_is_redrawn():
    dm = ClassificationData(data_cfg(corrupt={"fraction": 0.3, "splits": ["train"]}))
    dm.setup()
    assert not torch.equal(dm.splits["train"][0][0], dm.splits["train"][0][0])


def test_augmentation_keeps_shape():
    dm = ClassificationData(data_cfg(augment=True))
    dm.setup()
    assert dm.splits["train"][0][0].shape == (1, 16, 16)


def test_flat_image_folder(image_folder):
    dm = ClassificationData(
        data_cfg(dataset="imagefolder", root=str(image_folder), image_size=8, batch_size=4)
    )
    assert (dm.num_classes, dm.in_channels) == (3, 3)
    dm.setup()
    assert {s: len(d) for s, d in dm.splits.items()} == {"train": 24, "val": 4, "test": 8}
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 8, 8) and set(y.tolist()) <= {0, 1, 2}


def test_image_folder_with_split_directories(tmp_path):
    for split, n in (("train", 6), ("test", 2)):
        make_image_folder(tmp_path / split, classes=2, per_class=n)
    dm = ClassificationData(
        data_cfg(dataset="imagefolder", root=str(tmp_path), channels=1, val_fraction=0.25)
    )
    dm.setup()
    assert {s: len(d) for s, d in dm.splits.items()} == {"train": 9, "val": 3, "test": 4}
    assert dm.splits["val"][0][0].shape == (1, 32, 32)


def test_cifar_without_archive_is_refused_before_loading(tmp_path):
    from tasks.app.cli import load_config
    from tasks.app.config import ConfigError

    with pytest.raises(ConfigError, match="cifar-100-python"):
        load_config((), ["model.pool=avg", "data.dataset=cifar100", f"data.root={tmp_path}"])


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    from urllib.error import URLError

    from torchvision import datasets

    def offline(*args, **kwargs):
        raise URLError("network is unreachable")

    monkeypatch.setattr(datasets.CIFAR10, "download", offline)
    dm = ClassificationData(data_cfg(dataset="cifar10", root=str(tmp_path), download=True))
    with pytest.raises(RuntimeError, match="data.download=true: could not download cifar10"):
        dm.prepare_data()
