"""Photograph pairs: the second view is the first under the drawn homography (a known point
lands where the warp says), the ground truth follows the warp, patches are normalised."""

from __future__ import annotations

import numpy as np
from omegaconf import OmegaConf

from tasks.matching.config import DataConfig
from tasks.matching.photos import PhotoPairs, detect, ground_truth, harris, patches


def image_cfg(**images):
    cfg = OmegaConf.structured(DataConfig)
    cfg.warp.kinds = ["homography"]
    for key, value in images.items():
        cfg.images[key] = value
    return cfg


def spots(centres: list[tuple[float, float]], size: int = 256) -> np.ndarray:
    """A dark photograph with a bright Gaussian spot at each pixel (x, y) of ``centres``."""
    rows, cols = np.mgrid[:size, :size]
    image = sum(np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / 8.0) for x, y in centres)
    return image.astype(np.float32)


def test_known_points_land_where_the_warp_carries_them():
    cfg = image_cfg(contrast=0.0, brightness=0.0, blur=0.0, noise=0.0)
    source = PhotoPairs(["camera"], cfg.images, cfg.warp)
    source.photos = [spots([(110, 120), (150, 140)])]
    crop = cfg.images.crop
    for seed in range(3):
        sample, warp = source.draw(np.random.default_rng(seed))
        kpts0, kpts1 = sample["kpts0"].numpy(), sample["kpts1"].numpy()
        # One keypoint per spot in each view: in the first exactly the spots' offset apart.
        assert len(kpts0) == len(kpts1) == 2
        offset = np.abs(kpts0[0] - kpts0[1]) * crop
        np.testing.assert_allclose(offset, [40, 20], atol=1e-4)
        m0 = sample["matches0"].numpy()
        assert sorted(m0.tolist()) == [0, 1]
        # Each lands in the second view where the homography carries it (pixel rounding).
        assert np.linalg.norm(warp(kpts0) - kpts1[m0], axis=1).max() * crop < 2.0


def test_ground_truth_of_a_photograph_follows_the_warp():
    cfg = image_cfg()
    source = PhotoPairs(["camera"], cfg.images, cfg.warp)
    tol = cfg.images.match_px / cfg.images.crop
    for seed in range(2):
        sample, warp = source.draw(np.random.default_rng(seed))
        m0 = sample["matches0"].numpy()
        kpts0, kpts1 = sample["kpts0"].numpy(), sample["kpts1"].numpy()
        assert (m0 >= 0).sum() >= 10
        assert np.linalg.norm(warp(kpts0[m0 >= 0]) - kpts1[m0[m0 >= 0]], axis=1).max() < tol
        # every keypoint lies in its view, and matches1 is the inverse of matches0
        assert np.abs(kpts0).max() <= 0.5 and np.abs(kpts1).max() <= 0.5
        assert (sample["matches1"].numpy()[m0[m0 >= 0]] == np.flatnonzero(m0 >= 0)).all()
        assert sample["desc0"].shape == (len(kpts0), cfg.images.patch**2)
        norms = np.linalg.norm(sample["desc1"].numpy(), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert source.descriptor_dim == cfg.images.patch**2


def test_ground_truth_is_mutual_and_within_the_radius():
    identity = lambda x: x  # noqa: E731
    kpts0 = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    kpts1 = np.array([[0.1, 0.0], [0.3, 0.0], [1.05, 0.0]])
    # point 0's nearest is 0 and 0's nearest is 0; point 2 has nothing within the radius
    assert ground_truth(kpts0, kpts1, identity, 0.5).tolist() == [0, 2, -1]
    assert ground_truth(kpts0, kpts1[:0], identity, 0.5).tolist() == [-1, -1, -1]


def test_detector_and_patches_on_a_known_corner():
    image = np.zeros((40, 40), dtype=np.float32)
    image[20:, 20:] = 1.0  # one corner, at pixel (20, 20)
    xy = detect(harris(image, 1.5), border=8, min_distance=4, count=5)
    assert np.abs(xy[0] - [19.5, 19.5]).max() <= 1.0
    flat = patches(np.ones((20, 20)), np.array([[10, 10]]), 5)
    assert np.allclose(flat, 0.0), "a flat patch has no direction, not a NaN"
