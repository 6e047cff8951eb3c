"""The learning-rate schedule: its budget travels with the checkpoint, and a resume with another
budget carries the learning rate on from where it was, to zero at the new end."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from tasks.app.cli import load_config
from tasks.app.optim import WarmupCosine, configure, continue_schedule
from tasks.app.runner import run


def scheduler(total: int, warmup_epochs: int = 0, steps_per_epoch: float = 10.0):
    cfg = OmegaConf.create(
        {"name": "adamw", "lr": 1.0, "weight_decay": 0.0, "scheduler": "cosine"}
        | {"warmup_epochs": warmup_epochs, "momentum": 0.9}
    )
    param = torch.nn.Parameter(torch.zeros(1))
    out = configure([param], cfg, total, steps_per_epoch)
    return out["optimizer"], out["lr_scheduler"]["scheduler"]


def advance(optimizer, sched, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        optimizer.step()
        sched.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_warm_up_then_cosine_to_zero():
    schedule = WarmupCosine(total=100, warmup=10)
    assert schedule(0) == pytest.approx(1 / 11) and schedule(9) == pytest.approx(10 / 11)
    assert schedule(10) == 1.0 and schedule(55) == pytest.approx(0.5) and schedule(100) == 0.0
    assert schedule(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))


def test_the_planned_budget_is_restored_with_the_scheduler():
    optimizer, sched = scheduler(100)
    advance(optimizer, sched, 30)
    state = sched.state_dict()
    # a resume with a longer budget builds a schedule for it; loading the state puts back the
    # one the run was on
    optimizer2, sched2 = scheduler(200)
    optimizer2.load_state_dict(optimizer.state_dict())
    sched2.load_state_dict(state)
    assert sched2.lr_lambdas[0].total == 100
    assert continue_schedule(sched2, 100) is None
    assert advance(optimizer2, sched2, 70) == advance(optimizer, sched, 70)


def test_a_new_budget_continues_from_the_current_rate_to_zero_at_its_end():
    optimizer, sched = scheduler(100)
    before = advance(optimizer, sched, 40)[-1]
    note = continue_schedule(sched, 250)
    assert note is not None and "planned for 100" in note and "now 250" in note
    assert "from step 40" in note
    after = advance(optimizer, sched, 210)
    assert after[-1] == 0.0 and all(a >= b for a, b in zip(after, after[1:], strict=False))
    # no jump: the first new step moves the rate by less than one step of the old schedule
    assert before - after[0] < before - WarmupCosine(100, 0)(41) + 1e-12
    assert after[0] == pytest.approx(before * 0.5 * (1 + math.cos(math.pi / 210)))


def test_a_new_budget_inside_the_warm_up_finishes_the_warm_up_first():
    optimizer, sched = scheduler(100, warmup_epochs=2, steps_per_epoch=10)
    advance(optimizer, sched, 5)
    continue_schedule(sched, 300)
    lrs = advance(optimizer, sched, 295)
    assert lrs[14] == 1.0 and lrs[-1] == 0.0  # step 20 ends the warm-up, as planned


def test_a_finished_schedule_says_the_added_steps_do_nothing():
    optimizer, sched = scheduler(50)
    advance(optimizer, sched, 50)
    assert "leave the weights as they are" in continue_schedule(sched, 80)


class StopAfter(pl.Callback):
    """Ends fitting after ``steps`` optimiser steps, as if the run had been stopped there."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer: pl.Trainer, *_) -> None:
        trainer.should_stop = trainer.should_stop or trainer.global_step >= self.steps


def test_resuming_with_a_raised_budget_says_how_the_schedule_goes_on(quiet, runs_dir, caplog):
    args = [*quiet, "model.width=4", "data.batch_size=32", "name=raised", "test=false"]
    budget = ["trainer.limit_train_batches=3", "trainer.limit_val_batches=1"]
    # 2 epochs of 3 steps planned, stopped after 2 (a step checkpoint each step)
    first = [*args, *budget, "trainer.max_epochs=2", "checkpoint.every_n_steps=1"]
    run(load_config((), first), callbacks=[StopAfter(2)])
    resume = ["ckpt=last", "name=raised", f"runs_dir={runs_dir}", "trainer.max_epochs=4"]
    with caplog.at_level("INFO"):
        results = run(load_config((), resume))
    assert "planned for 6 optimiser steps and the budget is now 12" in caplog.text
    assert "from step 2 (factor 0.75 of optim.lr) it decays along a cosine" in caplog.text
    assert 0.0 < results["lr-AdamW"] < 0.75 * 3e-3  # on its way down, not started afresh
    saved = OmegaConf.load(runs_dir / "raised" / "config.yaml")
    assert saved.trainer.max_epochs == 4 and saved.trainer.limit_train_batches == 3
