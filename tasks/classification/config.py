"""Schema of the classification task: its ``data`` and ``model`` sections, and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tasks.app.config import RunConfig, check_choice, check_layer_options, check_range

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
ARCHS = ("small_cnn", "resnet18", "resnet34", "resnet50")
POOLS = ("avg", "max", "robust")
# ddn.PENALTIES' names, spelled out so that a config is checked before torch loads (a test
# keeps them equal)
PENALTIES = ("huber", "pseudo-huber", "quadratic", "truncated-quadratic", "welsch")
CORRUPTIONS = ("noise", "occluder", "pixels")
SPLITS = ("train", "val", "test")
# torchvision's folder name for each CIFAR archive, checked before anything trains.
CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


@dataclass
class CorruptionConfig:
    """Outliers in the input: a fraction of each image replaced, so robust pooling has
    something to be robust to. ``noise``: square patches of uniform noise; ``occluder``:
    square patches of one random colour; ``pixels``: scattered single pixels of noise.
    Validation and test corruption is fixed per image (seeded by ``data.split_seed``), so
    every run is scored on the same corrupted images; training corruption is redrawn."""

    fraction: float = 0.0
    kind: str = "noise"
    patches: int = 1
    splits: list[str] = field(default_factory=lambda: ["test"])


@dataclass
class DataConfig:
    dataset: str = "digits"
    # cifar10/cifar100: where torchvision's archive folder lives (or is downloaded to);
    # imagefolder: a tree root/<class>/<image>, or root/{train,val,test}/<class>/<image>.
    root: str = "data"
    download: bool = False
    # Side the images are resized to; null keeps the dataset's own (digits: 16, from 8).
    image_size: int | None = None
    # imagefolder only: 1 (grayscale) or 3 (RGB).
    channels: int = 3
    batch_size: int = 64
    num_workers: int = 0
    # Held-out fractions where the dataset has no split of its own (digits, a flat folder);
    # CIFAR keeps its official test set and holds val_fraction of its training set out.
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    # Seeds the split (and the fixed eval corruption) independently of the run's seed, so
    # every run sees the same test images.
    split_seed: int = 0
    # Random translations (and horizontal flips for natural images) on the training split.
    augment: bool = False
    corrupt: CorruptionConfig = field(default_factory=CorruptionConfig)


@dataclass
class ModelConfig:
    arch: str = "small_cnn"
    # small_cnn: channels of the first stage (the pooled features have 2 * width).
    width: int = 32
    # The final global pooling: avg, max, or robust (ddn.RobustPool2d with `penalty` and
    # `alpha`, in the run's ddn.backward_mode; `pool_kwargs` passes further options).
    pool: str = "robust"
    penalty: str = "welsch"
    alpha: float = 1.0
    pool_kwargs: dict[str, Any] = field(default_factory=dict)
    dropout: float = 0.0
    label_smoothing: float = 0.0


@dataclass
class ClassificationRun(RunConfig):
    task: str = "classification"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)


def validate(cfg: DictConfig) -> list[str]:
    problems: list[str] = []
    _check_data(cfg, problems)
    _check_model(cfg, problems)
    return problems


def _check_data(cfg: DictConfig, problems: list[str]) -> None:
    data = cfg.data
    check_choice(cfg, "data.dataset", DATASETS, problems)
    check_range(cfg, "data.image_size", problems, low=4)
    check_choice(cfg, "data.channels", [1, 3], problems)
    check_range(cfg, "data.batch_size", problems, low=1)
    check_range(cfg, "data.num_workers", problems, low=0)
    check_range(cfg, "data.val_fraction", problems, low=0.0, high=0.5)
    check_range(cfg, "data.test_fraction", problems, low=0.0, high=0.5)
    check_range(cfg, "data.corrupt.fraction", problems, low=0.0, high=0.9)
    check_choice(cfg, "data.corrupt.kind", CORRUPTIONS, problems)
    check_range(cfg, "data.corrupt.patches", problems, low=1)
    for split in data.corrupt.splits:
        if split not in SPLITS:
            problems.append(f"data.corrupt.splits: {split!r} is not one of {list(SPLITS)}")
    root = Path(data.root)
    if data.dataset in CIFAR_DIRS and not data.download:
        expected = root / CIFAR_DIRS[data.dataset]
        if not expected.is_dir():
            problems.append(
                f"data.root={data.root!r}: no {data.dataset} data (expected {expected}); "
                "point data.root at it, or set data.download=true when online"
            )
    if data.dataset == "imagefolder":
        tree = root / "train" if (root / "train").is_dir() else root
        if not tree.is_dir():
            problems.append(f"data.root={data.root!r}: no such directory for imagefolder")
        elif not any(p.is_dir() for p in tree.iterdir()):
            problems.append(f"data.root={data.root!r}: expected one sub-directory per class")


def _check_model(cfg: DictConfig, problems: list[str]) -> None:
    model = cfg.model
    check_choice(cfg, "model.arch", ARCHS, problems)
    check_range(cfg, "model.width", problems, low=1)
    check_range(cfg, "model.dropout", problems, low=0.0, high=0.99)
    check_range(cfg, "model.label_smoothing", problems, low=0.0, high=0.99)
    check_choice(cfg, "model.pool", POOLS, problems)
    if model.pool != "robust":
        return
    check_choice(cfg, "model.penalty", PENALTIES, problems)
    check_range(cfg, "model.alpha", problems, low=0.0, low_open=True)
    if not problems:
        check_layer_options(
            cfg,
            "model.pool_kwargs",
            "RobustPool2d",
            problems,
            penalty=model.penalty,
            alpha=model.alpha,
        )
