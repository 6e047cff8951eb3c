"""Helpers for the task tests: tiny, quiet runs in a temporary runs directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Settings that keep a run to a second or two on a shared 2-core machine: a 4-channel CNN,
# no progress bar or model summary, no W&B unless a test asks for it.
QUIET = [
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger.wandb=false",
    "model.width=4",
    "data.batch_size=32",
]


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    d = tmp_path / "runs"
    d.mkdir()
    return d


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
