"""Keypoint pairs from photographs: two views of one bundled photograph, detected and matched.

A sample is a square view (``data.images.crop`` pixels) of a photograph and a second view of
the same photograph under a random homography, each with its own photometric change
(brightness, contrast, blur, noise). Both views are rendered from the whole photograph, so what
the homography brings into the second view is real content, not a black border. Keypoints are
Harris corners detected on each view separately; a keypoint of the first view matches one of
the second when the homography carries it to within ``match_px`` pixels and each is the other's
nearest. Each keypoint also carries its ``patch`` x ``patch`` pixel patch, normalised to zero
mean and unit norm (the input of the model's descriptor and of the raw-patch baseline).

View coordinates are pixels less the view's centre, over the view's side: the unit square
centred at the origin, the units of ``data.warp``'s translation and perspective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cached_property

import numpy as np
from omegaconf import DictConfig
from scipy import ndimage

from tasks.matching.data import Sample, Warp, pair_sample, sample_warp

# Harris's k: the usual weight of the squared trace against the determinant.
HARRIS_K = 0.05


def load_photo(name: str, short_side: int) -> np.ndarray:
    """Grayscale float32 photograph from skimage.data, shorter side resized to ``short_side``."""
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
    scale = short_side / min(image.shape)
    return rescale(image, scale, anti_aliasing=scale < 1).astype(np.float32)


def harris(image: np.ndarray, sigma: float) -> np.ndarray:
    """Harris corner response of a 2-D image (same shape): det - k trace^2 of the structure
    tensor smoothed at ``sigma``."""
    gy, gx = np.gradient(image)
    # Three standard deviations hold all but 0.3% of the Gaussian's weight.
    xx = ndimage.gaussian_filter(gx * gx, sigma, truncate=3.0)
    yy = ndimage.gaussian_filter(gy * gy, sigma, truncate=3.0)
    xy = ndimage.gaussian_filter(gx * gy, sigma, truncate=3.0)
    return xx * yy - xy * xy - HARRIS_K * (xx + yy) ** 2


def detect(response: np.ndarray, border: int, min_distance: int, count: int) -> np.ndarray:
    """(K, 2) integer (x, y) pixel positions of the ``count`` strongest local maxima of
    ``response`` at least ``border`` pixels inside it, no two within ``min_distance``
    (a maximum filter), and above 1% of the strongest."""
    peak = ndimage.maximum_filter(response, size=2 * min_distance + 1, mode="nearest")
    keep = (response == peak) & (response > 0.01 * response.max())
    keep[:border] = keep[-border:] = False
    keep[:, :border] = keep[:, -border:] = False
    ys, xs = np.nonzero(keep)
    strongest = np.argsort(-response[ys, xs], kind="stable")[:count]
    return np.stack([xs[strongest], ys[strongest]], axis=1)


def patches(image: np.ndarray, xy: np.ndarray, size: int) -> np.ndarray:
    """(K, size * size) patches of ``image`` centred at integer ``xy`` (K, 2), each less its
    mean and over its norm (a flat patch stays zero); ``xy`` must lie ``size // 2`` inside."""
    half = size // 2
    offsets = np.arange(-half, half + 1)
    rows = xy[:, 1, None, None] + offsets[:, None]
    cols = xy[:, 0, None, None] + offsets
    out = image[rows, cols].reshape(len(xy), -1).astype(np.float64)
    out -= out.mean(1, keepdims=True)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)


def ground_truth(kpts0: np.ndarray, kpts1: np.ndarray, warp: Warp, radius: float) -> np.ndarray:
    """``matches0`` (K0,): for each point of ``kpts0`` (K0, 2) the index of the point of
    ``kpts1`` (K1, 2) that ``warp`` carries it to within ``radius`` when each is the other's
    nearest (all in the same units), else -1."""
    if not len(kpts0) or not len(kpts1):
        return np.full(len(kpts0), -1, dtype=np.int64)
    dist = np.linalg.norm(warp(kpts0)[:, None] - kpts1[None], axis=-1)
    nearest1, nearest0 = dist.argmin(1), dist.argmin(0)
    rows = np.arange(len(kpts0))
    mutual = nearest0[nearest1] == rows
    close = dist[rows, nearest1] < radius
    return np.where(mutual & close, nearest1, -1).astype(np.int64)


class PhotoPairs:
    """Pairs of views of the photographs ``names`` (the ``data.images`` section ``cfg``,
    warps drawn from ``data.warp``)."""

    def __init__(self, names: Sequence[str], cfg: DictConfig, warp: DictConfig) -> None:
        self.names = list(names)
        self.cfg = cfg
        self.warp_cfg = warp
        self.kinds = list(warp.kinds)
        self.descriptor_dim = cfg.patch**2

    @cached_property
    def photos(self) -> list[np.ndarray]:
        # Loaded on first use, in whichever process (DataLoader worker) draws samples.
        return [load_photo(name, self.cfg.short_side) for name in self.names]

    @property
    def margin(self) -> int:
        """Pixels rendered around each view, so that every keypoint has a whole patch."""
        return self.cfg.patch // 2 + 1

    def _render(self, photo: np.ndarray, to_photo: np.ndarray) -> np.ndarray:
        """The view (crop + 2 margin pixels square) whose pixel (x, y), counted from the
        view's corner, is photograph pixel ``to_photo @ (x, y, 1)`` (bilinear)."""
        side = self.cfg.crop + 2 * self.margin
        grid = np.arange(side, dtype=np.float64) - self.margin
        x, y = np.meshgrid(grid, grid)
        h = to_photo @ np.stack([x.ravel(), y.ravel(), np.ones(x.size)])
        coords = np.stack([h[1] / h[2], h[0] / h[2]]).astype(np.float32)
        view = ndimage.map_coordinates(photo, coords, order=1, mode="reflect")
        return view.reshape(side, side)

    def _slice(self, photo: np.ndarray, corner: np.ndarray) -> np.ndarray:
        """The unwarped view at integer ``corner`` (x, y), margin included: a copy of the
        photograph's pixels (reflected where the margin leaves it)."""
        m, crop = self.margin, self.cfg.crop
        x, y = corner
        height, width = photo.shape
        if m <= min(x, y) and x + crop + m <= width and y + crop + m <= height:
            return photo[y - m : y + crop + m, x - m : x + crop + m].copy()
        return self._render(photo, np.array([[1, 0, x], [0, 1, y], [0, 0, 1]], dtype=np.float64))

    def _photometric(self, view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Random contrast and brightness, blur and Gaussian noise, by ``data.images``."""
        cfg = self.cfg
        contrast = math.exp(rng.uniform(-1, 1) * math.log1p(cfg.contrast))
        shift = 0.5 + rng.uniform(-cfg.brightness, cfg.brightness)
        view = (view - np.float32(0.5)) * np.float32(contrast) + np.float32(shift)
        sigma = rng.uniform(0.0, cfg.blur)
        if sigma > 0.05:
            view = ndimage.gaussian_filter(view, sigma, truncate=3.0)
        noise = rng.standard_normal(view.shape, dtype=np.float32)
        return view + np.float32(rng.uniform(0.0, cfg.noise)) * noise

    def _keypoints(self, view: np.ndarray) -> np.ndarray:
        """Integer (x, y) positions in the rendered view (margin included)."""
        cfg = self.cfg
        response = harris(view, cfg.harris_sigma)
        return detect(response, self.margin + 2, cfg.min_distance, cfg.max_keypoints)

    def draw(self, rng: np.random.Generator, attempts: int = 20) -> tuple[Sample, Warp]:
        """A sample (see ``collate_pairs``) and the warp between the two views (in view
        coordinates); the tests check the one against the other. A view with fewer than two
        keypoints (a flat region) is drawn again."""
        for _ in range(attempts):
            drawn = self._attempt(rng)
            if drawn is not None:
                return drawn
        raise RuntimeError(
            f"fewer than 2 keypoints in {attempts} views of {self.names}; "
            "lower data.images.min_distance or raise data.images.crop"
        )

    def _attempt(self, rng: np.random.Generator) -> tuple[Sample, Warp] | None:
        cfg = self.cfg
        photo = self.photos[rng.integers(len(self.photos))]
        crop = cfg.crop
        # The first view lies a margin inside the photograph where it can, so that most of
        # what the second view shows is real content.
        room = np.array(photo.shape[::-1]) - crop
        corner = rng.integers(room // 4, room - room // 4 + 1)
        w = sample_warp(rng, self.kinds[rng.integers(len(self.kinds))], self.warp_cfg)
        # Pixels from the view's corner <-> view coordinates (unit square, centred).
        to_unit = np.array([[1 / crop, 0, -0.5], [0, 1 / crop, -0.5], [0, 0, 1]])
        shift = np.array([[1, 0, corner[0]], [0, 1, corner[1]], [0, 0, 1]], dtype=np.float64)
        view0 = self._slice(photo, corner)
        back = shift @ np.linalg.inv(to_unit) @ np.linalg.inv(w.H) @ to_unit
        view1 = self._render(photo, back)
        view0, view1 = self._photometric(view0, rng), self._photometric(view1, rng)
        xy0, xy1 = self._keypoints(view0), self._keypoints(view1)
        if len(xy0) < 2 or len(xy1) < 2:
            return None
        kpts0 = (xy0 - self.margin) / crop - 0.5
        kpts1 = (xy1 - self.margin) / crop - 0.5
        matches0 = ground_truth(kpts0, kpts1, w, cfg.match_px / crop)
        desc0 = patches(view0, xy0, cfg.patch)
        desc1 = patches(view1, xy1, cfg.patch)
        return pair_sample(kpts0, kpts1, matches0, rng, desc0, desc1), w

    def sample(self, rng: np.random.Generator) -> Sample:
        return self.draw(rng)[0]
