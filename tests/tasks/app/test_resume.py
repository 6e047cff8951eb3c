"""A killed run resumes to exactly the result it would have had.

Real processes and a real SIGKILL: each run is killed a random moment after one of its
checkpoints (every step writes one, so most kills land mid-epoch), resumed with ``ckpt=last``,
killed again, ..., and finally resumed to its end. Its final weights, test metrics and logged
losses must be bit-identical to those of the same config run without interruption
(``trainer.deterministic=true``, CPU). Dropout, augmentation and training-set corruption are on,
so that every random stream of a run is exercised.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from tasks.app.cli import ResumeWarning, load_config
from tasks.app.config import ConfigError
from tasks.app.rundir import PREVIOUS_LAST_CHECKPOINT
from tasks.app.runner import run
from tests.tasks.app.resume_helpers import (
    KilledRun,
    final_metrics,
    logged_losses,
    max_difference,
    position,
    weights,
)

TASKS = {
    "classification": [
        "model.width=4",
        "data.batch_size=32",
        "model.dropout=0.3",
        "data.augment=true",
        "data.corrupt.fraction=0.2",
        "data.corrupt.splits=[train,val,test]",
    ],
    "matching": [
        "task=matching",
        "model.dim=8",
        "model.heads=2",
        "model.layers=1",
        "data.batch_size=4",
        "data.train_size=64",
        "data.val_size=8",
        "data.test_size=8",
        "data.synthetic.min_inliers=5",
        "data.synthetic.max_inliers=9",
    ],
}
# Epochs of 6 steps, a checkpoint after every step.
BUDGET = [
    "seed=3",
    "trainer.deterministic=true",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
    "checkpoint.every_n_steps=1",
    "ddn.profile_every_n_steps=0",
]


@pytest.fixture
def restore_torch_flags():
    # An in-process run with trainer.deterministic=true switches torch's deterministic
    # algorithms on for the whole process; later tests must not inherit that.
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def assert_same_result(runs_dir: Path, killed: KilledRun) -> None:
    reference = runs_dir / "reference"
    assert max_difference(weights(reference), weights(killed.dir)) == 0.0
    assert final_metrics(killed.dir) == final_metrics(reference)
    # the logger's step goes on: each loss a part logged is the reference's at that step
    resumed, expected = logged_losses(killed.dir), logged_losses(reference)
    assert resumed and all(expected[step] == loss for step, loss in resumed.items())


def kill_moments(count: int) -> list[tuple[int, float]]:
    """``count`` random moments, each a fraction of a step after one of the next few
    checkpoints."""
    rng = random.Random()  # new moments every time: the result must not depend on them
    moments = [(rng.randint(2, 5), round(rng.uniform(0.0, 1.0), 2)) for _ in range(count)]
    print("SIGKILL (this many checkpoints after the start, then a fraction of a step):", moments)
    return moments


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classification", "matching"])
def test_a_killed_run_resumes_to_the_uninterrupted_result(
    task, quiet, runs_dir, tmp_path, train_processes
):
    args = [*quiet, *TASKS[task], *BUDGET]
    train_processes.run([*args, "name=reference"], tmp_path / "reference.log")
    killed = KilledRun(train_processes, runs_dir, tmp_path)
    killed.kill(args, kill_moments(3))
    # kills that all missed the middle of an epoch get company
    while not killed.finished and not any(s["batch"] for s in killed.starts):
        killed.kill(args, kill_moments(1))
    killed.finish()
    print(task, "resumed from", killed.starts)
    assert len(killed.starts) >= 2, "the run ended before it could be killed"
    assert any(s["batch"] for s in killed.starts), killed.starts
    assert_same_result(runs_dir, killed)


@pytest.mark.slow
@pytest.mark.ddp
def test_a_killed_ddp_run_resumes_to_the_uninterrupted_result(
    quiet, runs_dir, tmp_path, train_processes
):
    # 2 processes (gloo): each gradient element is the sum of two numbers, whatever the
    # reduction's order, so the result is bit-identical here too.
    args = ["-c", "configs/ddp.yaml", *quiet, *TASKS["classification"], *BUDGET]
    # The reference also logs to W&B and profiles the layers, neither of which may change
    # what it computes.
    logged = ["logger.wandb=true", "ddn.profile_every_n_steps=10"]
    train_processes.run([*args, *logged, "name=reference"], tmp_path / "reference.log")
    killed = KilledRun(train_processes, runs_dir, tmp_path)
    killed.kill(args, kill_moments(1))
    while not killed.finished and not any(s["batch"] for s in killed.starts):
        killed.kill(args, kill_moments(1))
    killed.finish()
    print("ddp resumed from", killed.starts)
    assert killed.starts, "the run ended before it could be killed"
    assert_same_result(runs_dir, killed)

    reference = runs_dir / "reference"  # both ranks used the one run directory
    assert len(list((reference / "wandb").glob("offline-run-*"))) == 1  # rank zero's
    results = json.loads((reference / "results.json").read_text())
    assert results["ddn/net_pool/bwd_peak_mib"] > 0
    assert "ddp" in (reference / "config.yaml").read_text()


def tear(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.slow
def test_a_torn_checkpoint_is_passed_over_for_the_previous_good_one(
    quiet, runs_dir, restore_torch_flags
):
    # 3 epochs of 5 steps, step checkpoints every 4: last.ckpt holds step 15, so does the best
    # (epoch002.ckpt), and last.prev.ckpt holds step 12.
    budget = ["trainer.max_epochs=3", "trainer.limit_train_batches=5", "checkpoint.every_n_steps=4"]
    args = [*quiet, *TASKS["classification"], *BUDGET, *budget]  # later keys win
    reference = run(load_config((), [*args, "name=torn"]))
    final = weights(runs_dir / "torn")
    checkpoints = runs_dir / "torn" / "checkpoints"
    last, best = checkpoints / "last.ckpt", checkpoints / "epoch002.ckpt"
    previous = checkpoints / PREVIOUS_LAST_CHECKPOINT
    assert [position(p)["step"] for p in (last, best, previous)] == [15, 15, 12]

    tear(last)
    with pytest.raises(ConfigError, match=f"ckpt='{last}'.*is damaged.*cut short"):
        load_config((), [*args, f"ckpt={last}"])
    with pytest.warns(ResumeWarning, match=f"{last} is damaged.*resuming from {best}"):
        assert load_config((), ["ckpt=last", "name=torn", f"runs_dir={runs_dir}"]).ckpt == str(best)
    tear(best)
    with pytest.warns(ResumeWarning) as warned:
        cfg = load_config((), ["ckpt=last", "name=torn", f"runs_dir={runs_dir}"])
    assert cfg.ckpt == str(previous) and len(warned) == 2
    resumed = run(cfg)  # steps 13 to 15 again
    assert max_difference(final, weights(runs_dir / "torn")) == 0.0
    assert {k: v for k, v in resumed.items() if k.startswith("test/")} == {
        k: v for k, v in reference.items() if k.startswith("test/")
    }


class KeepCheckpoints(pl.Callback):
    """Keeps a copy of each checkpoint that carries accumulated gradients."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.kept: list[Path] = []

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module, checkpoint: dict) -> None:
        if checkpoint["callbacks"].get("AccumulatedGradients"):
            self.kept.append(self.directory / f"{len(self.kept)}.ckpt")
            torch.save(checkpoint, self.kept[-1])


@pytest.mark.slow
def test_a_checkpoint_inside_an_accumulation_window_resumes_exactly(
    quiet, runs_dir, tmp_path, restore_torch_flags
):
    # Windows of 2 batches, a validation (and its checkpoint) after batch 3 of each 4: its
    # checkpoint must hold batch 3's gradients for the step that batch 4 completes.
    budget = ["trainer.max_epochs=2", "trainer.limit_train_batches=4",
              "trainer.accumulate_grad_batches=2", "trainer.val_check_interval=0.75",
              "checkpoint.every_n_steps=0", "test=false"]  # fmt: skip
    args = [*quiet, *TASKS["classification"], *BUDGET, *budget]
    keep = KeepCheckpoints(tmp_path)
    run(load_config((), [*args, "name=reference"]), callbacks=[keep])
    assert position(keep.kept[-1]) == {"step": 3, "epoch": 1, "batch": 3}  # inside step 4
    run(load_config((), [*args, "name=resumed", f"ckpt={keep.kept[-1]}"]))
    assert max_difference(weights(runs_dir / "reference"), weights(runs_dir / "resumed")) == 0.0
