"""Matching without the model's context or OT layer: mutual nearest neighbours and the Hungarian
algorithm (``scipy.optimize.linear_sum_assignment``) on Euclidean distances between raw
coordinates, and mutual nearest neighbours between descriptors (raw normalised pixel patches,
or the model's own learned descriptors: see tasks/matching/module.py).

Both produce candidate pairs with their distances; a pair is kept when its distance is at most
``max_distance``. Without a threshold outliers are always matched to something, so the fair
comparison gives each baseline the threshold that maximises its F1 on the validation set
(:func:`best_max_distance`), found exactly from the sorted candidate distances.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

# On coordinates; the descriptor baselines exist where the data (patch_nn) or the model
# (descriptor_nn) has descriptors.
BASELINES = ("nn", "hungarian")
DESCRIPTOR_BASELINES = ("patch_nn", "descriptor_nn")


def _distances(kpts0: torch.Tensor, kpts1: torch.Tensor, mask1: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(kpts0.double(), kpts1.double())
    return d.masked_fill(~mask1.unsqueeze(1), math.inf)


def nearest_neighbour(
    kpts0: torch.Tensor, kpts1: torch.Tensor, mask0: torch.Tensor, mask1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual nearest neighbours of (B, M, D) and (B, N, D) features (coordinates or
    descriptors): ``(matches0, distance)``, both (B, M); -1 and inf where a point of set 0
    has no candidate."""
    d = _distances(kpts0, kpts1, mask1).masked_fill(~mask0.unsqueeze(2), math.inf)
    dist, best1 = d.min(2)
    best0 = d.argmin(1)
    rows = torch.arange(d.shape[1], device=d.device)
    mutual = (best0.gather(1, best1) == rows) & mask0
    return torch.where(mutual, best1, -1), torch.where(mutual, dist, math.inf)


def hungarian(
    kpts0: torch.Tensor, kpts1: torch.Tensor, mask0: torch.Tensor, mask1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-total-distance one-to-one assignment of the smaller set into the larger:
    ``(matches0, distance)`` as for :func:`nearest_neighbour`."""
    d = _distances(kpts0, kpts1, mask1).cpu().numpy()
    matches = np.full(mask0.shape, -1, dtype=np.int64)
    dist = np.full(mask0.shape, math.inf)
    for b, (m, n) in enumerate(zip(mask0.sum(1).tolist(), mask1.sum(1).tolist(), strict=True)):
        rows, cols = linear_sum_assignment(d[b, :m, :n])
        matches[b, rows] = cols
        dist[b, rows] = d[b, rows, cols]
    return torch.from_numpy(matches).to(kpts0.device), torch.from_numpy(dist).to(kpts0.device)


def within(matches0: torch.Tensor, distance: torch.Tensor, max_distance: float) -> torch.Tensor:
    """The candidate pairs no farther apart than ``max_distance``; -1 for the rest."""
    return torch.where(distance <= max_distance, matches0, -1)


def best_max_distance(distance: np.ndarray, correct: np.ndarray, actual: int) -> float:
    """The threshold maximising F1 = 2 TP / (predicted + actual) over candidate pairs with
    these distances (``correct``: whether each is a ground-truth match; ``actual``: the number
    of ground-truth matches). Keeping the k nearest candidates is the only choice a threshold
    makes, so every k is tried."""
    order = np.argsort(distance, kind="stable")
    d, ok = distance[order], correct[order]
    finite = np.isfinite(d)
    d, ok = d[finite], ok[finite]
    if not len(d):
        return math.inf
    f1 = 2 * np.cumsum(ok) / (np.arange(1, len(d) + 1) + actual)
    k = int(np.argmax(f1))
    # Halfway to the next candidate, so that a distance equal to the chosen one is kept.
    return float(d[k] if k + 1 == len(d) else (d[k] + d[k + 1]) / 2)
