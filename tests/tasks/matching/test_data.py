"""Matching data: the generator's ground truth agrees with its warp, the sets have the
configured make-up, evaluation splits are fixed, and batches pad correctly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tasks.matching.config import DataConfig
from tasks.matching.data import (
    Fixed,
    Stream,
    SyntheticPairs,
    collate_pairs,
    sample_warp,
)


def data_cfg(**synthetic):
    cfg = OmegaConf.structured(DataConfig)
    for key, value in synthetic.items():
        cfg.synthetic[key] = value
    return cfg


def matched(sample):
    m0 = sample["matches0"].numpy()
    ok = m0 >= 0
    src = sample["kpts0"].numpy()[ok].astype(np.float64)
    tgt = sample["kpts1"].numpy()[m0[ok]].astype(np.float64)
    return src, tgt


@pytest.mark.parametrize("kind", ["similarity", "affine", "homography", "nonrigid"])
def test_warping_the_source_lands_on_the_target_within_the_noise(kind):
    noise = 0.01
    cfg = data_cfg(noise=noise)
    cfg.warp.kinds = [kind]
    source = SyntheticPairs(cfg.synthetic, cfg.warp)
    rng = np.random.default_rng(0)
    residuals = []
    for _ in range(20):
        sample, warp = source.draw(rng)
        src, tgt = matched(sample)
        residuals.append(warp(src) - tgt)
    r = np.concatenate(residuals)
    # Gaussian noise per coordinate: its RMS is the configured sigma, nothing lies 6 sigma out.
    assert np.sqrt((r**2).mean()) == pytest.approx(noise, rel=0.1)
    assert np.abs(r).max() < 6 * noise


def test_noise_free_matches_are_exact_and_the_warp_is_not_the_identity():
    source = SyntheticPairs(data_cfg(noise=0.0).synthetic, data_cfg().warp)
    sample, warp = source.draw(np.random.default_rng(1))
    src, tgt = matched(sample)
    np.testing.assert_allclose(warp(src), tgt, atol=1e-6)
    assert np.abs(src - tgt).max() > 0.05


def test_outliers_missing_points_and_counts():
    cfg = data_cfg(min_inliers=20, max_inliers=30, outlier_fraction=0.25, missing_fraction=0.2)
    source = SyntheticPairs(cfg.synthetic, cfg.warp)
    rng = np.random.default_rng(2)
    sizes, unmatched0, unmatched1 = set(), [], []
    for _ in range(50):
        s = source.sample(rng)
        m0, m1 = s["matches0"], s["matches1"]
        # one-to-one, and matches1 is the inverse of matches0
        assert len(set(m0[m0 >= 0].tolist())) == int((m0 >= 0).sum())
        assert torch.equal(m1[m0[m0 >= 0]], torch.nonzero(m0 >= 0).flatten())
        sizes.add((len(m0), len(m1)))
        unmatched0.append(float((m0 < 0).float().mean()))
        unmatched1.append(float((m1 < 0).float().mean()))
    assert len(sizes) > 10, "set sizes vary from sample to sample"
    assert all(20 <= m for m, _ in sizes)
    # set 1: outliers only (25%); set 0: outliers plus the inliers whose match went missing
    assert np.mean(unmatched1) == pytest.approx(0.25, abs=0.03)
    assert np.mean(unmatched0) == pytest.approx(0.25 + 0.75 * 0.2, abs=0.04)


def test_evaluation_splits_are_fixed_and_training_is_fresh():
    cfg = data_cfg()
    source = SyntheticPairs(cfg.synthetic, cfg.warp)
    a, b = Fixed(source, 4, 0, "val"), Fixed(source, 4, 0, "val")
    assert torch.equal(a[3]["kpts0"], b[3]["kpts0"])
    assert not torch.equal(a[3]["kpts0"], Fixed(source, 4, 0, "test")[3]["kpts0"])
    assert not torch.equal(a[3]["kpts0"], Fixed(source, 4, 1, "val")[3]["kpts0"])
    stream = Stream(source, 4)
    assert not torch.equal(stream[0]["kpts0"], stream[0]["kpts0"])
    torch.manual_seed(5)
    first = stream[1]["kpts0"]
    torch.manual_seed(5)
    assert torch.equal(first, stream[1]["kpts0"]), "seeded by torch's RNG"


def test_collate_pads_with_masks_and_unmatched():
    cfg = data_cfg()
    source = SyntheticPairs(cfg.synthetic, cfg.warp)
    rng = np.random.default_rng(3)
    samples = [source.sample(rng) for _ in range(3)]
    batch = collate_pairs(samples)
    for side in "01":
        sizes = [len(s[f"kpts{side}"]) for s in samples]
        assert batch[f"mask{side}"].sum(1).tolist() == sizes
        assert batch[f"kpts{side}"].shape == (3, max(sizes), 2)
        assert (batch[f"matches{side}"][~batch[f"mask{side}"]] == -1).all()
        for i, s in enumerate(samples):
            assert torch.equal(batch[f"kpts{side}"][i, : sizes[i]], s[f"kpts{side}"])


def test_homography_keeps_points_finite_at_the_largest_perspective():
    cfg = data_cfg()
    cfg.warp.perspective = 0.9
    rng = np.random.default_rng(4)
    corners = np.array([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])
    for _ in range(100):
        assert np.isfinite(sample_warp(rng, "homography", cfg.warp)(corners)).all()
