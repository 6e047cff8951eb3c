"""Optimiser and learning-rate schedule from the shared ``optim`` config section."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn


def build_optimizer(params: Iterable[nn.Parameter], cfg: DictConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
        )
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def configure(
    params: Iterable[nn.Parameter], cfg: DictConfig, total_steps: float, steps_per_epoch: float
) -> dict[str, Any]:
    """What ``LightningModule.configure_optimizers`` returns: the optimiser, and with
    ``scheduler=cosine`` a per-step linear warm-up then cosine decay to zero.

    ``total_steps`` is ``trainer.estimated_stepping_batches``; when it is unbounded (no
    max_epochs or max_steps) the learning rate stays constant.
    """
    optimizer = build_optimizer(params, cfg)
    if cfg.scheduler == "none" or not math.isfinite(total_steps):
        return {"optimizer": optimizer}
    total = max(1, int(total_steps))
    warmup = min(total - 1, int(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
