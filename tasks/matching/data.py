"""Pairs of 2-D keypoint sets with their ground-truth partial assignment.

Two sources share one sample format (a dict of tensors, see :func:`collate_pairs`):

- ``synthetic``: random points in the unit square, carried by a random warp
  (similarity/affine/homography/non-rigid), with Gaussian noise, outliers on both sides and
  missing counterparts;
- ``images``: Harris corners of two views of one of scikit-image's bundled photographs, the
  second under a random warp and both under photometric changes, with their pixel patches
  (:mod:`tasks.matching.photos`); the ground truth comes from the warp, so detector noise,
  corners that appear in one view only and points leaving the frame are the real thing.

Training sample ``i`` of epoch ``e`` is a function of ``(seed, e, i)`` (fresh every epoch, the
same in a resumed run and in any DataLoader worker); validation and test sample ``i`` is a
function of ``(data.split_seed, split, i)`` alone, the same in every run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from tasks.app.data import SplitData
from tasks.app.sampling import ItemKey, split_key

Sample = dict[str, torch.Tensor]
_SPLIT_CODES = {"val": 1, "test": 2}


@dataclass(frozen=True)
class Warp:
    """``x -> H (x + d(x))`` on (k, 2) arrays: a smooth displacement ``d`` (a sum of Gaussian
    bumps; none when ``centers`` is empty), then the projective map ``H`` (3 x 3)."""

    H: np.ndarray
    centers: np.ndarray
    offsets: np.ndarray
    width: float = 1.0

    def __call__(self, points: np.ndarray) -> np.ndarray:
        x = np.asarray(points, dtype=np.float64)
        if len(self.centers):
            sq = ((x[:, None, :] - self.centers[None]) ** 2).sum(-1)
            x = x + np.exp(-sq / (2 * self.width**2)) @ self.offsets
        h = x @ self.H[:, :2].T + self.H[:, 2]
        return h[:, :2] / h[:, 2:]


def sample_warp(rng: np.random.Generator, kind: str, cfg: DictConfig) -> Warp:
    """A random warp of ``kind`` with the strengths of ``cfg`` (a ``data.warp`` section)."""
    theta = math.radians(rng.uniform(-cfg.rotation, cfg.rotation))
    scale = math.exp(rng.uniform(-1, 1) * math.log1p(cfg.scale))
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    A = scale * rot
    if kind != "similarity":
        # Aspect ratio and shear in the rotated frame: det(A) stays scale^2.
        aspect = math.exp(rng.uniform(-1, 1) * math.log1p(cfg.anisotropy))
        shear = rng.uniform(-cfg.shear, cfg.shear)
        A = A @ np.array([[math.sqrt(aspect), shear], [0.0, 1.0 / math.sqrt(aspect)]])
    H = np.eye(3)
    H[:2, :2] = A
    H[:2, 2] = rng.uniform(-cfg.translation, cfg.translation, 2)
    if kind == "homography":
        H[2, :2] = rng.uniform(-cfg.perspective, cfg.perspective, 2)
    centers = np.empty((0, 2))
    offsets = np.empty((0, 2))
    if kind == "nonrigid":
        centers = rng.uniform(-0.5, 0.5, (cfg.bumps, 2))
        offsets = rng.normal(0.0, cfg.nonrigid, (cfg.bumps, 2))
    return Warp(H, centers, offsets, cfg.bump_width)


def pair_sample(
    kpts0: np.ndarray,
    kpts1: np.ndarray,
    matches0: np.ndarray,
    rng: np.random.Generator,
    desc0: np.ndarray | None = None,
    desc1: np.ndarray | None = None,
) -> Sample:
    """A sample with both sets shuffled, so that no index order gives the matches away."""
    p0, p1 = rng.permutation(len(kpts0)), rng.permutation(len(kpts1))
    where1 = np.empty_like(p1)
    where1[p1] = np.arange(len(p1))  # old index in set 1 -> new index
    m0 = matches0[p0]
    m0 = np.where(m0 >= 0, where1[np.maximum(m0, 0)], -1)
    m1 = np.full(len(kpts1), -1, dtype=np.int64)
    m1[m0[m0 >= 0]] = np.flatnonzero(m0 >= 0)
    sample = {
        "kpts0": torch.from_numpy(kpts0[p0]).float(),
        "kpts1": torch.from_numpy(kpts1[p1]).float(),
        "matches0": torch.from_numpy(m0).long(),
        "matches1": torch.from_numpy(m1).long(),
    }
    if desc0 is not None and desc1 is not None:
        sample["desc0"] = torch.from_numpy(desc0[p0]).float()
        sample["desc1"] = torch.from_numpy(desc1[p1]).float()
    return sample


class PairSource(Protocol):
    descriptor_dim: int

    def sample(self, rng: np.random.Generator) -> Sample: ...


class SyntheticPairs:
    """Random point sets (``data.synthetic``) under random warps (``data.warp``)."""

    descriptor_dim = 0

    def __init__(self, cfg: DictConfig, warp: DictConfig) -> None:
        self.cfg = cfg
        self.warp_cfg = warp
        self.kinds = list(warp.kinds)

    def draw(self, rng: np.random.Generator) -> tuple[Sample, Warp]:
        """A sample and the warp that made it (the tests check the one against the other)."""
        cfg = self.cfg
        warp = sample_warp(rng, self.kinds[rng.integers(len(self.kinds))], self.warp_cfg)
        n_in = int(rng.integers(cfg.min_inliers, cfg.max_inliers + 1))
        src = rng.uniform(-0.5, 0.5, (n_in, 2))
        kept = np.flatnonzero(rng.random(n_in) >= cfg.missing_fraction)
        tgt = warp(src[kept]) + rng.normal(0.0, cfg.noise, (len(kept), 2))
        # Outliers make up outlier_fraction of each set, and set 1 is never empty.
        ratio = cfg.outlier_fraction / (1.0 - cfg.outlier_fraction)
        n_out0 = round(ratio * n_in)
        n_out1 = max(round(ratio * len(kept)), 0 if len(kept) else 1)
        out0 = rng.uniform(-0.5, 0.5, (n_out0, 2))
        # Outliers of set 1 are drawn where its inliers are (the warped square), so that
        # neither where a point lies nor the spread of a set tells outliers from inliers.
        out1 = warp(rng.uniform(-0.5, 0.5, (n_out1, 2)))
        matches0 = np.full(n_in + n_out0, -1, dtype=np.int64)
        matches0[kept] = np.arange(len(kept))
        sample = pair_sample(
            np.concatenate([src, out0]), np.concatenate([tgt, out1]), matches0, rng
        )
        return sample, warp

    def sample(self, rng: np.random.Generator) -> Sample:
        return self.draw(rng)[0]


class Stream(Dataset):
    """``size`` fresh samples per pass. Through the training sampler item ``i`` comes with the
    seed of ``(run seed, epoch, i)`` (an :class:`~tasks.app.sampling.ItemKey`): fresh every
    epoch, the same in a resumed run. A plain index draws a seed from torch's RNG."""

    def __init__(self, source: PairSource, size: int) -> None:
        self.source = source
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int | ItemKey) -> Sample:
        i, seed = split_key(key)
        if seed is None:
            seed = int(torch.randint(2**62, ()))
        return self.source.sample(np.random.default_rng([seed, i]))


class Fixed(Dataset):
    """``size`` samples fixed by ``(seed, split)``: item ``i`` is the same in every run;
    drawn on first access and kept."""

    def __init__(self, source: PairSource, size: int, seed: int, split: str) -> None:
        self.source = source
        self.size = size
        self.key = (seed, _SPLIT_CODES[split])
        self.cache: dict[int, Sample] = {}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Sample:
        if i not in self.cache:
            self.cache[i] = self.source.sample(np.random.default_rng([*self.key, i]))
        return self.cache[i]


def collate_pairs(samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Pad a list of samples into a batch.

    ``kpts0`` (B, M, 2) and ``kpts1`` (B, N, 2), zero past each set's end; ``mask0`` (B, M) and
    ``mask1`` (B, N), true on real points; ``matches0`` (B, M), the index in set 1 of each
    point's counterpart or -1 (unmatched, and padding); ``matches1`` (B, N) likewise; and
    ``desc0``/``desc1`` (B, M, D)/(B, N, D) when the samples carry descriptors.
    """
    batch: dict[str, torch.Tensor] = {}
    for side in ("0", "1"):
        sizes = [len(s[f"kpts{side}"]) for s in samples]
        mask = torch.arange(max(sizes)) < torch.tensor(sizes)[:, None]
        batch[f"mask{side}"] = mask
        for key, fill in (("kpts", 0.0), ("matches", -1), ("desc", 0.0)):
            name = f"{key}{side}"
            if name in samples[0]:
                batch[name] = torch.nn.utils.rnn.pad_sequence(
                    [s[name] for s in samples], batch_first=True, padding_value=fill
                )
    return batch


def build_sources(cfg: DictConfig) -> dict[str, PairSource]:
    """The source of each split (``train``, ``val``, ``test``) of a ``data`` section."""
    if cfg.source == "images":
        from tasks.matching.photos import PhotoPairs

        images = cfg.images
        return {
            split: PhotoPairs(images[f"{split}_images"], images, cfg.warp)
            for split in ("train", "val", "test")
        }
    source = SyntheticPairs(cfg.synthetic, cfg.warp)
    return dict.fromkeys(("train", "val", "test"), source)


class MatchingData(SplitData):
    """``descriptor_dim`` is known at construction (the model is built from it). Training
    items are random already, so the training loader does not shuffle them."""

    shuffle_train = False

    def __init__(self, cfg: DictConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed, collate_fn=collate_pairs)
        self.sources = build_sources(cfg)
        self.descriptor_dim = self.sources["train"].descriptor_dim

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        cfg = self.cfg
        self.splits = {
            "train": Stream(self.sources["train"], cfg.train_size),
            "val": Fixed(self.sources["val"], cfg.val_size, cfg.split_seed, "val"),
            "test": Fixed(self.sources["test"], cfg.test_size, cfg.split_seed, "test"),
        }
