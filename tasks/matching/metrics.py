"""Precision, recall and F1 of predicted matches, as torchmetrics Metrics.

A prediction is ``matches0`` (B, M): for each point of set 0 the index of its predicted
counterpart in set 1, or -1 for none (padding is -1 in both prediction and ground truth). A
predicted pair is a true positive when the ground truth has exactly that pair. The counts are
summed over the whole split (micro-averaged: a sample with more matches weighs more) and, being
metric states with ``dist_reduce_fx="sum"``, over all DDP ranks before the ratios are taken.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric, MetricCollection


class _MatchCounts(Metric):
    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("true_positives", "predicted", "actual"):
            self.add_state(name, default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, pred_matches0: torch.Tensor, gt_matches0: torch.Tensor) -> None:
        predicted = pred_matches0 >= 0
        self.true_positives += (predicted & (pred_matches0 == gt_matches0)).sum()
        self.predicted += predicted.sum()
        self.actual += (gt_matches0 >= 0).sum()

    def _ratio(self, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        # No prediction (or no ground-truth match) at all scores 0 rather than NaN.
        return num.float() / den.clamp_min(1).float()


class MatchPrecision(_MatchCounts):
    """Fraction of predicted pairs that are ground-truth matches."""

    def compute(self) -> torch.Tensor:
        return self._ratio(self.true_positives, self.predicted)


class MatchRecall(_MatchCounts):
    """Fraction of ground-truth matches that were predicted."""

    def compute(self) -> torch.Tensor:
        return self._ratio(self.true_positives, self.actual)


class MatchF1(_MatchCounts):
    """Harmonic mean of precision and recall: 2 TP / (predicted + actual)."""

    def compute(self) -> torch.Tensor:
        return self._ratio(2 * self.true_positives, self.predicted + self.actual)


def match_metrics(prefix: str = "") -> MetricCollection:
    """``<prefix>precision``, ``<prefix>recall``, ``<prefix>f1``; the three share one set of
    counts (torchmetrics' compute groups), so each batch is counted once."""
    return MetricCollection(
        {"precision": MatchPrecision(), "recall": MatchRecall(), "f1": MatchF1()}, prefix=prefix
    )
