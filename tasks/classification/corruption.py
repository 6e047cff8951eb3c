"""Outlier corruption of input images: a fraction of each image replaced by junk.

Images are (C, H, W) floats in [0, 1], before normalisation. A corrupted region produces
feature vectors unlike the rest of the image; average pooling mixes them into the result,
robust pooling can down-weight them.
"""

from __future__ import annotations

import math

import torch


class Corruption:
    """Replace ``fraction`` of each image's pixels.

    ``kind="noise"``: ``patches`` rectangles of uniform noise, together covering the fraction
    (they may overlap); ``"occluder"``: the same rectangles, each filled with one random colour;
    ``"pixels"``: that fraction of single pixels, scattered, set to uniform noise.
    """

    def __init__(self, fraction: float, kind: str = "noise", patches: int = 1) -> None:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1), got {fraction}")
        if kind not in ("noise", "occluder", "pixels"):
            raise ValueError(f"kind must be one of ['noise', 'occluder', 'pixels'], got {kind!r}")
        if patches < 1:
            raise ValueError(f"patches must be >= 1, got {patches}")
        self.fraction = fraction
        self.kind = kind
        self.patches = patches

    def __repr__(self) -> str:
        return f"Corruption(fraction={self.fraction}, kind={self.kind!r}, patches={self.patches})"

    def __call__(
        self, image: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A corrupted copy of ``image``; ``generator`` fixes the draw (None: global RNG)."""
        if self.fraction == 0.0:
            return image
        out = image.clone()
        c, h, w = out.shape
        if self.kind == "pixels":
            count = round(self.fraction * h * w)
            where = torch.randperm(h * w, generator=generator)[:count]
            noise = torch.rand(c, count, generator=generator, dtype=out.dtype)
            out.view(c, h * w)[:, where] = noise
            return out
        ph, pw = _patch_shape(self.fraction * h * w / self.patches, h, w)
        for _ in range(self.patches):
            top = int(torch.randint(0, h - ph + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - pw + 1, (1,), generator=generator))
            if self.kind == "noise":
                fill = torch.rand(c, ph, pw, generator=generator, dtype=out.dtype)
            else:
                fill = torch.rand(c, 1, 1, generator=generator, dtype=out.dtype)
            out[:, top : top + ph, left : left + pw] = fill
        return out


def _patch_shape(area: float, h: int, w: int) -> tuple[int, int]:
    # The rectangle nearest to a square of the requested area that fits in the image.
    ph = min(h, max(1, round(math.sqrt(area))))
    pw = min(w, max(1, round(area / ph)))
    return ph, pw
