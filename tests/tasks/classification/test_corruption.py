"""The outlier corruption replaces exactly the requested share of each image."""

from __future__ import annotations

import pytest
import torch

from tasks.classification.corruption import Corruption


def changed(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    return (before != after).any(dim=0)


@pytest.mark.parametrize("kind", ["noise", "occluder", "pixels"])
def test_fraction_of_pixels_replaced(kind):
    image = torch.full((3, 20, 20), -1.0)  # outside [0, 1], so every replaced pixel shows
    out = Corruption(0.3, kind)(image, torch.Generator().manual_seed(0))
    assert changed(image, out).float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert out.min() >= 0 or kind != "pixels" or changed(image, out).any()
    assert torch.equal(image, torch.full((3, 20, 20), -1.0)), "input must not be modified"


def test_patch_is_one_rectangle_and_occluder_is_one_colour():
    image = torch.full((1, 16, 16), -1.0)
    out = Corruption(0.25, "occluder")(image, torch.Generator().manual_seed(1))
    rows, cols = changed(image, out).nonzero(as_tuple=True)
    assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) == 64
    assert out[0, rows, cols].unique().numel() == 1


def test_fixed_generator_repeats_and_global_rng_varies():
    image = torch.zeros(1, 16, 16)
    corrupt = Corruption(0.3, "noise", patches=2)
    a = corrupt(image, torch.Generator().manual_seed(5))
    b = corrupt(image, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert not torch.equal(corrupt(image), corrupt(image))


def test_zero_fraction_is_identity_and_bad_arguments_fail():
    image = torch.rand(1, 8, 8)
    assert Corruption(0.0)(image) is image
    with pytest.raises(ValueError, match="fraction"):
        Corruption(1.0)
    with pytest.raises(ValueError, match="kind"):
        Corruption(0.1, "blur")
    with pytest.raises(ValueError, match="patches"):
        Corruption(0.1, patches=0)
