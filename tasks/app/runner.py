"""One run from a validated config: build, fit, test, log, summarise."""

from __future__ import annotations

import json
import os
import sys
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
    RichProgressBar,
)
from pytorch_lightning.utilities import rank_zero_only

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
from tasks.app.config import RunConfig, backward_mode
from tasks.app.layers import declarative_layers, set_backward_mode
from tasks.app.loggers import (
    build_loggers,
    finish_wandb,
    hyperparameters,
    run_metadata,
    shell_path,
    write_run_files,
)
from tasks.app.quiet import LayerWarnings, silence_library_noise
from tasks.app.registry import get_task
from tasks.app.stats import medians
from tasks.app.summary import ModelTable, print_summary

RESULTS_FILE = rundir.RESULTS_FILE


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
    if cfg.ckpt is not None:
        callbacks.append(ResumeNotice(cfg.name, cfg.ckpt))
    # Lightning writes last.ckpt even at the end of a fast_dev_run, where it would be
    # mistaken for a run to resume; smoke runs get no checkpoint callback at all.
    if not cfg.trainer.fast_dev_run:
        callbacks += checkpoint_callbacks(cfg, run_dir)
    if has_logger:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    if cfg.trainer.enable_progress_bar:
        callbacks.append(RichProgressBar())
    if cfg.trainer.enable_model_summary:
        callbacks.append(ModelTable(max_depth=2))
    return callbacks


class ResumeNotice(pl.Callback):
    """Says, once the checkpoint is restored, where a resumed run starts again."""

    def __init__(self, name: str, ckpt: str) -> None:
        self.name = name
        self.ckpt = ckpt

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            print(
                f"resuming {self.name} from epoch {trainer.current_epoch}, step "
                f"{trainer.global_step} (checkpoint {self.ckpt})",
                flush=True,
            )


def build_task_module(cfg: DictConfig, datamodule: pl.LightningDataModule) -> pl.LightningModule:
    """The task's LightningModule with ``ddn.backward_mode`` set on every declarative layer."""
    module = get_task(cfg.task).build_module(cfg, datamodule)
    set_backward_mode(module, backward_mode(cfg))
    return module


def run(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any]:
    """Fit (resuming from ``cfg.ckpt`` if set), test the best checkpoint, print a summary.

    Returns the run's results (also written to ``<run_dir>/results.json``): the last logged
    metrics, the best monitored value, test metrics, timings and the profiler's medians;
    ``<run_dir>/summary.json`` has the same with each measured statistic's spread (see
    :func:`write_summary`). A resumed run that had already finished its budget is not run
    again: its saved results come back. ``callbacks`` are added to the harness's own (early
    stopping, extra monitoring, ...).
    """
    silence_library_noise()
    spec = get_task(cfg.task)
    run_dir = Path(cfg.runs_dir) / cfg.name
    done = rundir.finished_run(cfg)
    if done is not None:
        _say_finished(cfg, run_dir, done)
        return json.loads((run_dir / RESULTS_FILE).read_text())
    # Lightning ignores loggers and checkpoints under fast_dev_run; skip making them.
    smoke = bool(cfg.trainer.fast_dev_run)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    _warn_if_unsuitable(cfg, spec.unsuitable_modes)

    meta = run_metadata(cfg)
    if not smoke:
        write_run_files(cfg, run_dir, meta)
    datamodule = spec.build_datamodule(cfg)
    module = build_task_module(cfg, datamodule)
    layers = {key: type(layer).__name__ for key, layer in layer_keys(module)}
    loggers = [] if smoke else build_loggers(cfg, run_dir, sorted(set(layers.values())))
    all_callbacks = build_callbacks(cfg, run_dir, bool(loggers)) + list(callbacks)
    checkpoint = next((c for c in all_callbacks if isinstance(c, ModelCheckpoint)), None)
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    # the harness adds its own model summary (ModelTable); Lightning would announce it skips its
    trainer_args["enable_model_summary"] = False
    trainer = pl.Trainer(
        **trainer_args,
        default_root_dir=str(run_dir),
        logger=loggers or False,
        callbacks=all_callbacks,
        enable_checkpointing=checkpoint is not None,
        plugins=[AtomicCheckpointIO()],
    )
    profiler = next(c for c in all_callbacks if isinstance(c, DDNProfiler))
    stats: dict[str, Any] = {}
    try:
        for logger in loggers:
            logger.log_hyperparams(hyperparameters(cfg, meta, layers))
        with LayerWarnings() as layer_warnings, _quiet_resume(cfg):
            results, stats = _fit_and_test(cfg, trainer, module, datamodule, checkpoint)
    finally:
        shapes = {f"ddn_layer_shapes/{k}": v for k, v in profiler.shapes.items()}
        sync_command = finish_wandb(wandb_summary(stats), shapes) if loggers else None

    if trainer.is_global_zero:
        if not smoke:
            (run_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
            write_summary(cfg, run_dir, trainer, stats, layers, profiler.shapes)
        _print(cfg, spec.summary, results, stats, trainer, checkpoint, run_dir, sync_command)
        for line in layer_warnings.report():
            print(f"warning: {line}", file=sys.stderr)
    return results


def layer_keys(module: pl.LightningModule) -> list[tuple[str, Any]]:
    """The declarative layers under the names their metrics have (``ddn/<key>/...``)."""
    return [(name.replace(".", "_") or "model", m) for name, m in declarative_layers(module)]


def _warn_if_unsuitable(cfg: DictConfig, unsuitable: dict[str, str]) -> None:
    reason = unsuitable.get(cfg.ddn.backward_mode)
    if reason is not None and rank_zero_only.rank == 0:
        print(
            f"warning: ddn.backward_mode={cfg.ddn.backward_mode} cannot train the {cfg.task} "
            f"task: {reason} (use another mode)",
            file=sys.stderr,
            flush=True,
        )


@contextmanager
def _quiet_resume(cfg: DictConfig) -> Iterator[None]:
    # Lightning warns that the checkpoint directory is not empty: a resumed run's is meant to be.
    with warnings.catch_warnings():
        if cfg.ckpt is not None:
            warnings.filterwarnings("ignore", r"Checkpoint directory .* exists and is not empty")
        yield


def _say_finished(cfg: DictConfig, run_dir: Path, done: dict[str, Any]) -> None:
    if rank_zero_only.rank != 0:
        return
    runs_dir = "" if cfg.runs_dir == RunConfig.runs_dir else f" runs_dir={cfg.runs_dir}"
    print(
        f"run {cfg.name} already finished: epoch {done.get('epochs')}, step {done.get('steps')} "
        f"of its budget; nothing was trained or tested again. Its results:\n"
        f"  {run_dir / rundir.SUMMARY_FILE}\n"
        "To train it longer, raise the budget, for example:\n"
        f"  {shell_path(Path(sys.executable))} train.py ckpt=last name={cfg.name}{runs_dir} "
        f"trainer.max_epochs={cfg.trainer.max_epochs + 10}",
        flush=True,
    )


def _fit_and_test(
    cfg: DictConfig,
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    checkpoint: ModelCheckpoint | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit, then test the best checkpoint: the metrics and timings (medians), and the
    measured statistics with their spread (``{"median", "p25", "p75", "n"}`` each)."""
    start = time.perf_counter()
    with _run_name_for_other_ranks(cfg.name):
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt)
    fit_seconds = time.perf_counter() - start
    # before testing: restoring the best checkpoint for the test also restores the callbacks'
    # states, which would take the profiler back to the samples it had at that checkpoint
    stats: dict[str, Any] = {}
    for kind in (DDNProfiler, StepTimer):
        stats.update(next(c for c in trainer.callbacks if isinstance(c, kind)).summary())
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
    results.update(medians(stats))
    return results, stats


def wandb_summary(stats: dict[str, Any]) -> dict[str, float]:
    """W&B summary metrics: each statistic's median under its own name (what W&B's tables
    and charts compare across runs), and ``<name>_p25``, ``_p75``, ``_n`` beside it."""
    out: dict[str, float] = {}
    for key, value in stats.items():
        out[key] = value["median"]
        for part in ("p25", "p75", "n"):
            out[f"{key}_{part}"] = value[part]
    return out


def write_summary(
    cfg: DictConfig,
    run_dir: Path,
    trainer: pl.Trainer,
    stats: dict[str, Any],
    layers: dict[str, str],
    shapes: dict[str, list[list[int]]],
) -> None:
    """``<run_dir>/summary.json``: the run's final metrics (test, best), every measured
    statistic as ``{"median", "p25", "p75", "n"}``, the layers (type, input shapes), where the
    run stopped and the budget it had (what tells ``ckpt=last`` that it is finished)."""
    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("test/", "val/"))
    }
    if cfg.test is False:
        metrics = {k: v for k, v in metrics.items() if not k.startswith("test/")}
    checkpoint = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    if checkpoint is not None and checkpoint.best_model_score is not None:
        metrics[f"best/{checkpoint.monitor}"] = float(checkpoint.best_model_score)
    summary = {
        "run": cfg.name,
        "task": cfg.task,
        "backward_mode": cfg.ddn.backward_mode,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "budget": rundir.budget(cfg),
        "layers": {k: {"type": t, "input_shapes": shapes.get(k, [])} for k, t in layers.items()},
        **metrics,
        **stats,
    }
    (run_dir / rundir.SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def _print(
    cfg: DictConfig,
    metrics: Sequence[str],
    results: dict[str, Any],
    stats: dict[str, Any],
    trainer: pl.Trainer,
    checkpoint: ModelCheckpoint | None,
    run_dir: Path,
    sync_command: str | None,
) -> None:
    n_layers = len({k.split("/")[1] for k in stats if k.startswith("ddn/")})
    rows: dict[str, Any] = {
        "run": cfg.name,
        "task": cfg.task,
        "backward mode": f"{cfg.ddn.backward_mode} ({n_layers} declarative layers measured)",
        "epochs / steps": f"{trainer.current_epoch} / {trainer.global_step}",
        "fit time (s)": results.get("fit_seconds"),
    }
    step = stats.get(StepTimer.metric)
    if step is not None:
        rows["train step (ms)"] = (
            f"median {step['median']:.4g}, p25-p75 {step['p25']:.4g}-{step['p75']:.4g}, "
            f"{step['n']} steps"
        )
    if checkpoint is not None and f"best/{checkpoint.monitor}" in results:
        rows[f"best {checkpoint.monitor}"] = results[f"best/{checkpoint.monitor}"]
    rows.update({m: results[m] for m in metrics if m in results})
    lines: list[tuple[str, str]] = []
    if not cfg.trainer.fast_dev_run:
        lines.append(("Run directory (config, results, summary.json, logs)", str(run_dir)))
    if checkpoint is not None and checkpoint.best_model_path:
        lines.append(("Best checkpoint", checkpoint.best_model_path))
    if sync_command is not None:
        lines.append(("Upload the run to W&B (offline until then)", sync_command))
    print_summary(f"Run summary: {cfg.name}", rows, stats, lines)
