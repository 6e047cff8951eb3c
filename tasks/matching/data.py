"""Pairs of 2-D keypoint sets with their ground-truth partial assignment.

Two sources share one sample format (a dict of tensors, see :func:`collate_pairs`):

- ``synthetic``: random points in the unit square, carried by a random warp
  (similarity/affine/homography/non-rigid), with Gaussian noise, outliers on both sides and
  missing counterparts;
- ``images``: Harris corners of one of scikit-image's bundled photographs and of a copy
  resampled under a random warp; the ground truth comes from the warp, so detector noise,
  corners that appear in one image only and points leaving the frame are the real thing.

Training sample ``i`` of epoch ``e`` is a function of ``(seed, e, i)`` (fresh every epoch, the
same in a resumed run and in any DataLoader worker); validation and test sample ``i`` is a
function of ``(data.split_seed, split, i)`` alone, the same in every run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
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


def _pair(
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
        sample = _pair(np.concatenate([src, out0]), np.concatenate([tgt, out1]), matches0, rng)
        return sample, warp

    def sample(self, rng: np.random.Generator) -> Sample:
        return self.draw(rng)[0]


def _load_photo(name: str, size: int) -> np.ndarray:
    """Grayscale float photograph from skimage.data, its longer side resized to ``size``."""
    import skimage.data
    from skimage.color import rgb2gray, rgba2rgb
    from skimage.transform import rescale

    image = getattr(skimage.data, name)()
    if image.ndim == 3 and image.shape[-1] == 4:
        image = rgba2rgb(image)
    if image.ndim == 3:
        image = rgb2gray(image)
    image = image.astype(np.float64)
    if image.max() > 1.0:
        image = image / 255.0
    return rescale(image, size / max(image.shape), anti_aliasing=True)


class ImagePairs:
    """Harris corners of a bundled photograph and of a warped copy (``data.images``)."""

    def __init__(self, names: Sequence[str], cfg: DictConfig, warp: DictConfig) -> None:
        self.names = list(names)
        self.cfg = cfg
        self.warp_cfg = warp
        self.kinds = list(warp.kinds)
        self.descriptor_dim = cfg.patch**2 if cfg.descriptors else 0

    @cached_property
    def photos(self) -> list[np.ndarray]:
        # Loaded on first use, in whichever process (DataLoader worker) draws samples.
        return [_load_photo(name, self.cfg.size) for name in self.names]

    def _keypoints(self, image: np.ndarray) -> np.ndarray:
        from skimage.feature import corner_harris, corner_peaks

        peaks = corner_peaks(
            corner_harris(image, sigma=1.5),
            min_distance=self.cfg.min_distance,
            threshold_rel=0.02,
            num_peaks=self.cfg.max_keypoints,
        )
        return peaks[:, ::-1].astype(np.float64)  # (row, col) -> (x, y)

    def _patches(self, image: np.ndarray, xy: np.ndarray) -> np.ndarray:
        half = self.cfg.patch // 2
        padded = np.pad(image, half, mode="reflect")
        cols = np.rint(xy[:, 0]).astype(int)[:, None, None] + np.arange(-half, half + 1)
        rows = np.rint(xy[:, 1]).astype(int)[:, None, None] + np.arange(-half, half + 1)[:, None]
        patches = padded[rows + half, cols + half].reshape(len(xy), -1)
        patches = patches - patches.mean(1, keepdims=True)
        return patches / np.maximum(np.linalg.norm(patches, axis=1, keepdims=True), 1e-6)

    def draw(self, rng: np.random.Generator, attempts: int = 20) -> tuple[Sample, Warp]:
        from skimage.transform import ProjectiveTransform, warp

        for _ in range(attempts):
            image = self.photos[rng.integers(len(self.photos))]
            kind = self.kinds[rng.integers(len(self.kinds))]
            w = sample_warp(rng, kind, self.warp_cfg)
            h, wd = image.shape
            side = max(h, wd)
            # Normalised coordinates: pixels less the image centre, over the longer side.
            to_unit = np.array(
                [[1 / side, 0, -wd / 2 / side], [0, 1 / side, -h / 2 / side], [0, 0, 1]]
            )
            H_px = np.linalg.inv(to_unit) @ w.H @ to_unit
            warped = warp(image, ProjectiveTransform(np.linalg.inv(H_px)), output_shape=image.shape)
            xy0, xy1 = self._keypoints(image), self._keypoints(warped)
            if len(xy0) and len(xy1):
                break
        else:
            raise RuntimeError(
                f"no keypoints found in {attempts} warped copies of {self.names}; "
                "lower data.images.min_distance or raise data.images.size"
            )
        proj = ProjectiveTransform(H_px)(xy0)
        dist = np.linalg.norm(proj[:, None] - xy1[None], axis=-1)
        nearest1, nearest0 = dist.argmin(1), dist.argmin(0)
        mutual = nearest0[nearest1] == np.arange(len(xy0))
        close = dist[np.arange(len(xy0)), nearest1] < self.cfg.match_px
        matches0 = np.where(mutual & close, nearest1, -1)
        desc0 = desc1 = None
        if self.cfg.descriptors:
            desc0, desc1 = self._patches(image, xy0), self._patches(warped, xy1)
        kpts0 = (np.c_[xy0, np.ones(len(xy0))] @ to_unit.T)[:, :2]
        kpts1 = (np.c_[xy1, np.ones(len(xy1))] @ to_unit.T)[:, :2]
        return _pair(kpts0, kpts1, matches0, rng, desc0, desc1), w

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


def build_sources(cfg: DictConfig) -> tuple[PairSource, PairSource]:
    """(training source, evaluation source) of a ``data`` section."""
    if cfg.source == "images":
        return (
            ImagePairs(cfg.images.train_images, cfg.images, cfg.warp),
            ImagePairs(cfg.images.eval_images, cfg.images, cfg.warp),
        )
    source = SyntheticPairs(cfg.synthetic, cfg.warp)
    return source, source


class MatchingData(SplitData):
    """``descriptor_dim`` is known at construction (the model is built from it). Training
    items are random already, so the training loader does not shuffle them."""

    shuffle_train = False

    def __init__(self, cfg: DictConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed, collate_fn=collate_pairs)
        self.train_source, self.eval_source = build_sources(cfg)
        self.descriptor_dim = self.train_source.descriptor_dim

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        cfg = self.cfg
        self.splits = {
            "train": Stream(self.train_source, cfg.train_size),
            "val": Fixed(self.eval_source, cfg.val_size, cfg.split_seed, "val"),
            "test": Fixed(self.eval_source, cfg.test_size, cfg.split_seed, "test"),
        }
