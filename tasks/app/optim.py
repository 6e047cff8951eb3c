"""Optimiser and learning-rate schedule from the shared ``optim`` config section.

The schedule is a :class:`WarmupCosine` object, whose fields (the step budget it was planned
for among them) travel in every checkpoint with the scheduler's state, so that a resumed run
continues the schedule it was on, not one planned afresh for whatever budget it was given.

The rule when a resume changes the budget (``ckpt=last trainer.max_epochs=...``, or
``max_steps``): the learning rate carries on from the value it had at the checkpoint and decays
along a cosine to zero at the new budget's end; a resume inside the warm-up finishes the warm-up
first. The run says so when it starts (:func:`continue_schedule`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn


class WarmupCosine:
    """Factor on the base learning rate at optimiser step ``step``: a linear warm-up over the
    first ``warmup`` steps, then ``start_factor`` decaying along a cosine from step ``start`` to
    zero at step ``total`` (``start = warmup`` and ``start_factor = 1`` until a budget change).
    """

    def __init__(self, total: int, warmup: int) -> None:
        self.total = total
        self.warmup = warmup
        self.start = warmup
        self.start_factor = 1.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = (step - self.start) / max(1, self.total - self.start)
        return self.start_factor * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def rebudget(self, total: int, step: int) -> None:
        """Continue from ``step`` with the factor it has now, to zero at ``total``."""
        if step > self.warmup:
            self.start_factor = self(step)
            self.start = step
        self.total = total


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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total, warmup))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def continue_schedule(scheduler: Any, total_steps: float) -> str | None:
    """After a resume: keep the restored schedule when its budget is ``total_steps``, else
    re-plan its rest by the module's rule; returns what was done, for the log (None: nothing)."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return None
    schedule = scheduler.lr_lambdas[0]
    if not isinstance(schedule, WarmupCosine) or not math.isfinite(total_steps):
        return None
    total, step = max(1, int(total_steps)), scheduler.last_epoch
    if total == schedule.total:
        return None
    planned, factor = schedule.total, schedule(step)
    schedule.rebudget(total, step)
    note = (
        f"the learning-rate schedule was planned for {planned} optimiser steps and the budget "
        f"is now {total}: from step {step} (factor {factor:.4g} of optim.lr) it decays along a "
        f"cosine to zero at step {total}"
    )
    if factor == 0.0:
        note += "; it had reached zero already, so the added steps leave the weights as they are"
    return note
