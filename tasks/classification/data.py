"""Data of the classification task: scikit-learn's digits, CIFAR-10/100, any image folder.

Every source yields (C, H, W) float images in [0, 1] and integer labels, split into fixed
train/val/test sets (seeded by ``data.split_seed``, independent of the run's seed). Training
augmentation and the outlier corruption act on [0, 1] images; normalisation comes last.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2

from tasks.app.data import SplitData
from tasks.app.sampling import ItemKey, split_key
from tasks.classification.config import CIFAR_DIRS
from tasks.classification.corruption import Corruption

_CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_NATIVE_SIZE = {"digits": 16, "cifar10": 32, "cifar100": 32, "imagefolder": 32}


class TensorImages(Dataset):
    """Images already in memory: (N, C, H, W) floats in [0, 1] and (N,) labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


class VisionImages(Dataset):
    """Items ``indices`` of a torchvision dataset of PIL images, as [0, 1] tensors."""

    def __init__(
        self, dataset: Dataset, indices: Sequence[int], channels: int, size: int | None
    ) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.mode = "L" if channels == 1 else "RGB"
        self.size = size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[self.indices[i]]
        x = v2.functional.to_dtype(
            v2.functional.to_image(image.convert(self.mode)), torch.float32, scale=True
        )
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = v2.functional.resize(x, [self.size, self.size], antialias=True)
        return x, int(label)


class Prepared(Dataset):
    """A split ready for the model: augmentation, corruption, then normalisation.

    ``fixed_seed`` makes the corruption of image ``i`` the same in every epoch and every run
    (evaluation splits); None draws it afresh from the global RNG (training).
    """

    def __init__(
        self,
        base: Dataset,
        mean: Sequence[float],
        std: Sequence[float],
        augment: v2.Transform | None = None,
        corruption: Corruption | None = None,
        fixed_seed: int | None = None,
    ) -> None:
        self.base = base
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.augment = augment
        self.corruption = corruption
        self.fixed_seed = fixed_seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | ItemKey) -> tuple[torch.Tensor, int]:
        i, seed = split_key(key)
        x, y = self.base[i]
        if seed is None:
            x = self._draw(x, i)
        else:
            # the training sampler's key fixes this item's draws, whichever process or
            # DataLoader worker makes them and whatever was drawn before
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x = self._draw(x, i)
        return (x - self.mean) / self.std, y

    def _draw(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if self.augment is not None:
            x = self.augment(x)
        if self.corruption is not None:
            generator = None
            if self.fixed_seed is not None:
                generator = torch.Generator().manual_seed(self.fixed_seed * 1_000_003 + i)
            x = self.corruption(x, generator)
        return x


class ClassificationData(SplitData):
    """``num_classes``, ``in_channels`` and ``image_size`` are known at construction (the
    model is built from them); the images are loaded in :meth:`setup`."""

    def __init__(self, cfg: DictConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.image_size = cfg.image_size or _NATIVE_SIZE[cfg.dataset]
        if cfg.dataset == "digits":
            self.num_classes, self.in_channels = 10, 1
        elif cfg.dataset in CIFAR_DIRS:
            self.num_classes, self.in_channels = (10 if cfg.dataset == "cifar10" else 100), 3
        else:
            classes, _ = datasets.folder.find_classes(str(_folder_tree(Path(cfg.root))))
            self.num_classes, self.in_channels = len(classes), cfg.channels

    def prepare_data(self) -> None:
        # Runs on one process per node before setup: the only place that may download.
        if self.cfg.dataset in CIFAR_DIRS and self.cfg.download:
            cls = datasets.CIFAR10 if self.cfg.dataset == "cifar10" else datasets.CIFAR100
            try:
                for train in (True, False):
                    cls(self.cfg.root, train=train, download=True)
            except OSError as err:  # URLError and socket errors: offline, or the host is down
                raise RuntimeError(
                    f"data.download=true: could not download {self.cfg.dataset} ({err}); "
                    f"run once where it can, or put the archive under data.root={self.cfg.root!r}"
                ) from err

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.cfg.dataset == "digits":
            raw, mean, std = self._digits()
        elif self.cfg.dataset in CIFAR_DIRS:
            raw, mean, std = self._cifar()
        else:
            raw, mean, std = self._imagefolder()
        corrupt = self.cfg.corrupt
        corruption = None
        if corrupt.fraction > 0:
            corruption = Corruption(corrupt.fraction, corrupt.kind, corrupt.patches)
        for split, base in raw.items():
            train = split == "train"
            self.splits[split] = Prepared(
                base,
                mean,
                std,
                augment=self._augmentation() if train and self.cfg.augment else None,
                corruption=corruption if split in corrupt.splits else None,
                fixed_seed=None if train else self.cfg.split_seed,
            )

    def drop_last(self, train: Dataset) -> bool:
        # A lone last sample would break BatchNorm; dropping it costs nothing.
        return len(train) > self.cfg.batch_size

    def _augmentation(self) -> v2.Transform:
        pad = max(1, self.image_size // 8)
        steps: list[v2.Transform] = [
            v2.RandomCrop(self.image_size, padding=pad, padding_mode="edge")
        ]
        if self.cfg.dataset != "digits":
            steps.append(v2.RandomHorizontalFlip())
        return v2.Compose(steps)

    def _digits(self) -> tuple[dict[str, Dataset], list[float], list[float]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        # 8x8 images with values 0..16, upsampled once so the CNN has room for a few layers.
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        images = images.clamp_(0.0, 1.0)
        labels = torch.tensor(digits.target)
        idx = _stratified_split(
            digits.target, self.cfg.val_fraction, self.cfg.test_fraction, self.cfg.split_seed
        )
        raw = {s: TensorImages(images[i], labels[i]) for s, i in idx.items()}
        train = images[idx["train"]]
        return raw, [float(train.mean())], [float(train.std())]

    def _cifar(self) -> tuple[dict[str, Dataset], tuple[float, ...], tuple[float, ...]]:
        cls = datasets.CIFAR10 if self.cfg.dataset == "cifar10" else datasets.CIFAR100
        train_set = cls(self.cfg.root, train=True, download=False)
        test_set = cls(self.cfg.root, train=False, download=False)
        order = np.random.default_rng(self.cfg.split_seed).permutation(len(train_set))
        n_val = round(self.cfg.val_fraction * len(train_set))
        size = self.image_size
        raw = {
            "train": VisionImages(train_set, order[n_val:], 3, size),
            "val": VisionImages(train_set, order[:n_val], 3, size),
            "test": VisionImages(test_set, range(len(test_set)), 3, size),
        }
        return raw, *_CIFAR_STATS

    def _imagefolder(self) -> tuple[dict[str, Dataset], list[float], list[float]]:
        root = Path(self.cfg.root)
        channels, size = self.cfg.channels, self.image_size
        if (root / "train").is_dir():
            trees = {
                s: datasets.ImageFolder(str(root / s))
                for s in ("train", "val", "test")
                if (root / s).is_dir()
            }
        else:
            trees = {"train": datasets.ImageFolder(str(root))}
        train = trees["train"]
        missing = [s for s in ("val", "test") if s not in trees]
        val_fraction = self.cfg.val_fraction if "val" in missing else 0.0
        test_fraction = self.cfg.test_fraction if "test" in missing else 0.0
        idx = _stratified_split(train.targets, val_fraction, test_fraction, self.cfg.split_seed)
        raw: dict[str, Dataset] = {"train": VisionImages(train, idx["train"], channels, size)}
        for split in ("val", "test"):
            if split in trees:
                ds = trees[split]
                if ds.class_to_idx != train.class_to_idx:
                    raise ValueError(
                        f"data.root: {root / split} has other classes than {root / 'train'}"
                    )
                raw[split] = VisionImages(ds, range(len(ds)), channels, size)
            else:
                raw[split] = VisionImages(train, idx[split], channels, size)
        half = [0.5] * channels
        return raw, half, half


def _folder_tree(root: Path) -> Path:
    return root / "train" if (root / "train").is_dir() else root


def _stratified_split(
    labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Index arrays per split, stratified by label; a zero fraction gives an empty split."""
    labels = np.asarray(labels)
    rest = np.arange(len(labels))
    out: dict[str, np.ndarray] = {}
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        if fraction == 0:
            out[split] = np.empty(0, dtype=np.int64)
            continue
        # The fraction is of the whole set, so rescale it to what is left.
        share = fraction * len(labels) / len(rest)
        rest, out[split] = train_test_split(
            rest, test_size=share, stratify=labels[rest], random_state=seed
        )
    out["train"] = rest
    return {s: np.sort(i) for s, i in out.items()}
