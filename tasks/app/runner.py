"""One run from a validated config: build, fit, test, log, summarise."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    RichModelSummary,
    RichProgressBar,
)

from tasks.app import rundir
from tasks.app.callbacks import (
    AccumulatedGradients,
    DataPosition,
    DDNProfiler,
    LastCheckpoint,
    RandomStates,
    StepTimer,
)
from tasks.app.checkpoints import AtomicCheckpointIO
from tasks.app.config import backward_mode
from tasks.app.layers import declarative_layers, set_backward_mode
from tasks.app.loggers import (
    build_loggers,
    finish_wandb,
    hyperparameters,
    run_metadata,
    write_run_files,
)
from tasks.app.registry import get_task
from tasks.app.summary import print_summary

RESULTS_FILE = "results.json"

# Lightning suggests DataLoader workers; for in-memory datasets (digits) they cost more than
# they save, and data.num_workers is there for the others.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# The first checkpoint callback is the one that keeps the best (see checkpoint_callbacks).
warnings.filterwarnings("ignore", ".*configured with multiple `ModelCheckpoint` callbacks.*")
# Lightning looks for the position in the epoch in the loader; DataPosition keeps it and the
# data module starts from it, so a mid-epoch resume does continue with the next batch.
warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*")


@contextmanager
def _run_name_for_other_ranks(name: str) -> Iterator[None]:
    # Lightning's "ddp" launcher starts ranks 1.. inside fit() by re-running train.py; they
    # inherit this variable and so pick the same run directory (see tasks/app/cli.py).
    previous = os.environ.get(rundir.RUN_NAME_ENV)
    os.environ[rundir.RUN_NAME_ENV] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(rundir.RUN_NAME_ENV, None)
        else:
            os.environ[rundir.RUN_NAME_ENV] = previous


def checkpoint_callbacks(cfg: DictConfig, run_dir: Path) -> list[ModelCheckpoint]:
    """The best checkpoints (by the monitored metric; the newest when nothing is validated),
    ``last.ckpt`` every ``checkpoint.every_n_epochs`` epochs and, with
    ``checkpoint.every_n_steps``, every that many optimiser steps too."""
    spec = get_task(cfg.task)
    validating = cfg.trainer.limit_val_batches != 0
    dirpath = str(run_dir / rundir.CHECKPOINT_DIR)
    # A resumed run rewrites a file of the killed one under the same name, with the same
    # contents, rather than leave it beside a "-v1" copy.
    callbacks = [
        ModelCheckpoint(
            dirpath=dirpath,
            filename="epoch{epoch:03d}",
            auto_insert_metric_name=False,
            monitor=(cfg.checkpoint.monitor or spec.monitor) if validating else None,
            mode=cfg.checkpoint.mode or spec.monitor_mode,
            save_top_k=cfg.checkpoint.save_top_k if validating else 1,
            every_n_epochs=cfg.checkpoint.every_n_epochs,
            enable_version_counter=False,
        ),
        LastCheckpoint(dirpath, every_n_epochs=cfg.checkpoint.every_n_epochs),
    ]
    if cfg.checkpoint.every_n_steps > 0:
        callbacks.append(LastCheckpoint(dirpath, every_n_train_steps=cfg.checkpoint.every_n_steps))
    return callbacks


def build_callbacks(cfg: DictConfig, run_dir: Path, has_logger: bool) -> list[pl.Callback]:
    callbacks: list[pl.Callback] = [
        DDNProfiler(cfg.ddn.profile_every_n_steps, cfg.ddn.profile_memory),
        StepTimer(),
        RandomStates(),
        AccumulatedGradients(),
        DataPosition(),
    ]
    # Lightning writes last.ckpt even at the end of a fast_dev_run, where it would be
    # mistaken for a run to resume; smoke runs get no checkpoint callback at all.
    if not cfg.trainer.fast_dev_run:
        callbacks += checkpoint_callbacks(cfg, run_dir)
    if has_logger:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    if cfg.trainer.enable_progress_bar:
        callbacks.append(RichProgressBar())
    if cfg.trainer.enable_model_summary:
        callbacks.append(RichModelSummary(max_depth=2))
    return callbacks


def build_task_module(cfg: DictConfig, datamodule: pl.LightningDataModule) -> pl.LightningModule:
    """The task's LightningModule with ``ddn.backward_mode`` set on every declarative layer."""
    module = get_task(cfg.task).build_module(cfg, datamodule)
    set_backward_mode(module, backward_mode(cfg))
    return module


def run(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any]:
    """Fit (resuming from ``cfg.ckpt`` if set), test the best checkpoint, print a summary.

    Returns the run's results (also written to ``<run_dir>/results.json``): the last logged
    metrics, the best monitored value, test metrics, timings and the profiler's medians.
    ``callbacks`` are added to the harness's own (early stopping, extra monitoring, ...).
    """
    spec = get_task(cfg.task)
    run_dir = Path(cfg.runs_dir) / cfg.name
    # Lightning ignores loggers and checkpoints under fast_dev_run; skip making them.
    smoke = bool(cfg.trainer.fast_dev_run)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    meta = run_metadata(cfg)
    if not smoke:
        write_run_files(cfg, run_dir, meta)
    datamodule = spec.build_datamodule(cfg)
    module = build_task_module(cfg, datamodule)
    loggers = [] if smoke else build_loggers(cfg, run_dir)
    all_callbacks = build_callbacks(cfg, run_dir, bool(loggers)) + list(callbacks)
    checkpoint = next((c for c in all_callbacks if isinstance(c, ModelCheckpoint)), None)
    trainer = pl.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        default_root_dir=str(run_dir),
        logger=loggers or False,
        callbacks=all_callbacks,
        enable_checkpointing=checkpoint is not None,
        plugins=[AtomicCheckpointIO()],
    )
    try:
        for logger in loggers:
            logger.log_hyperparams(hyperparameters(cfg, meta))
        results = _fit_and_test(cfg, trainer, module, datamodule, checkpoint)
    finally:
        sync_command = finish_wandb() if loggers else None

    if trainer.is_global_zero:
        if not smoke:
            (run_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
        n_layers = len(declarative_layers(module))
        _print(cfg, spec.summary, results, trainer, checkpoint, run_dir, n_layers, sync_command)
    return results


def _fit_and_test(
    cfg: DictConfig,
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    checkpoint: ModelCheckpoint | None,
) -> dict[str, Any]:
    """Fit, then test the best checkpoint: the metrics, timings and the callbacks' summaries."""
    start = time.perf_counter()
    with _run_name_for_other_ranks(cfg.name):
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt)
    fit_seconds = time.perf_counter() - start
    results: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if checkpoint is not None and checkpoint.best_model_score is not None:
        results[f"best/{checkpoint.monitor}"] = float(checkpoint.best_model_score)
    if cfg.test:
        best = "best" if checkpoint is not None and checkpoint.best_model_path else None
        start = time.perf_counter()
        for metrics in trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False):
            results.update({k: float(v) for k, v in metrics.items()})
        results["test_seconds"] = time.perf_counter() - start
    results["fit_seconds"] = fit_seconds
    for kind in (DDNProfiler, StepTimer):
        results.update(next(c for c in trainer.callbacks if isinstance(c, kind)).summary())
    return results


def _print(
    cfg: DictConfig,
    metrics: Sequence[str],
    results: dict[str, Any],
    trainer: pl.Trainer,
    checkpoint: ModelCheckpoint | None,
    run_dir: Path,
    n_layers: int,
    sync_command: str | None,
) -> None:
    rows: dict[str, Any] = {
        "run": cfg.name,
        "task": cfg.task,
        "backward mode": f"{cfg.ddn.backward_mode} ({n_layers} declarative layers)",
        "epochs / steps": f"{trainer.current_epoch} / {trainer.global_step}",
        "fit time (s)": results.get("fit_seconds"),
    }
    if checkpoint is not None and f"best/{checkpoint.monitor}" in results:
        rows[f"best {checkpoint.monitor}"] = results[f"best/{checkpoint.monitor}"]
    rows.update({m: results[m] for m in metrics if m in results})
    rows["best checkpoint"] = checkpoint.best_model_path if checkpoint is not None else None
    rows["run directory"] = str(run_dir) if not cfg.trainer.fast_dev_run else None
    rows["upload to W&B"] = sync_command
    layers: dict[str, dict[str, float]] = {}
    for key, value in results.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "ddn":
            layers.setdefault(parts[1], {})[parts[2]] = value
    print_summary(f"Run summary: {cfg.name}", rows, layers)
