"""Loggers of a run (W&B, offline by default, and CSV) and the record saved with every run."""

from __future__ import annotations

import json
import os
import platform
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from tasks.app import rundir

_WANDB_ID_FILE = "wandb_id"


def git_state(cwd: Path | None = None) -> dict[str, Any]:
    """Commit of the code that ran, and whether the working tree had uncommitted changes."""
    cwd = cwd or Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def run_metadata(cfg: DictConfig) -> dict[str, Any]:
    return {
        "name": cfg.name,
        "task": cfg.task,
        "backward_mode": cfg.ddn.backward_mode,
        "git": git_state(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pytorch_lightning": pl.__version__,
        },
        "host": platform.node(),
    }


@rank_zero_only
def write_run_files(cfg: DictConfig, run_dir: Path, meta: dict[str, Any]) -> None:
    """``config.yaml`` (what ``ckpt=last`` reloads) and ``run.json`` (``meta``: provenance)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # Without ckpt: a resumed run's saved config must not point at its own checkpoint.
    saved = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "ckpt"])
    OmegaConf.save(saved, run_dir / rundir.CONFIG_FILE, resolve=True)
    (run_dir / rundir.METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def hyperparameters(
    cfg: DictConfig, meta: dict[str, Any], layers: dict[str, str] | None = None
) -> dict[str, Any]:
    """What the loggers record as the run's config: the resolved config plus provenance and
    ``layers`` (declarative layer name -> its class), so that W&B can group runs by them."""
    params = OmegaConf.to_container(cfg, resolve=True)
    params["ddn_layers"] = dict(layers or {})
    params["git_commit"] = meta["git"]["commit"]
    params["git_dirty"] = meta["git"]["dirty"]
    params["versions"] = meta["versions"]
    return params


def _wandb_id(run_dir: Path) -> str:
    # One id per run directory, so that a resumed online run continues its W&B run; under a
    # `wandb agent` it is the agent's (WANDB_RUN_ID), so that the sweep sees its run report.
    path = run_dir / _WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4)
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


class _WandbLogger(WandbLogger):
    """Lightning's W&B logger without the two arguments it always hands ``wandb.init`` that
    this wandb version warns about: ``anonymous`` (deprecated) and, offline, ``resume`` (which
    an offline run cannot use; the run id in the run directory is what continues a run)."""

    def __init__(self, *args: Any, offline: bool, **kwargs: Any) -> None:
        super().__init__(*args, offline=offline, **kwargs)
        self._wandb_init.pop("anonymous", None)
        if offline:
            self._wandb_init.pop("resume", None)


def build_loggers(
    cfg: DictConfig, run_dir: Path, layer_types: list[str] | None = None
) -> list[Logger]:
    """W&B (tags: task, backward mode, the types of the declarative layers, ``logger.tags``)
    and CSV, as configured."""
    log = cfg.logger
    loggers: list[Logger] = []
    if log.wandb:
        import wandb  # here, not at the top: a run without W&B need not pay for importing it

        mode = cfg.ddn.backward_mode
        tags = list(dict.fromkeys([cfg.task, mode, *(layer_types or []), *log.tags]))
        loggers.append(
            _WandbLogger(
                name=cfg.name,
                project=log.project,
                entity=log.entity,
                group=log.group or f"{cfg.task}-{mode}",
                tags=tags,
                job_type=cfg.task,
                save_dir=str(log.save_dir or run_dir),
                id=_wandb_id(run_dir),
                offline=not log.online,
                mode="online" if log.online else "offline",
                # W&B's own end-of-run printout repeats what the run summary shows; offline,
                # its start-up lines only say where the files go, which the summary prints.
                settings=wandb.Settings(quiet=True, silent=not log.online),
            )
        )
    if log.csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv"))
    return loggers


def shell_path(path: Path) -> str:
    """``path`` as typed in a shell: relative to the working directory when it is under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def wandb_command() -> str:
    """``wandb`` as a fresh shell can run it: the one beside this Python (a virtual
    environment's bin/ is not on PATH unless activated)."""
    exe = Path(sys.executable).parent / "wandb"
    return shell_path(exe) if exe.is_file() else "wandb"


def finish_wandb(
    summary: dict[str, Any] | None = None, config: dict[str, Any] | None = None
) -> str | None:
    """Close this process's W&B run, so that another run can start in it (tests, sweeps),
    after adding ``summary`` to its summary metrics and ``config`` to its config; returns the
    command that uploads it when it was offline."""
    wandb = sys.modules.get("wandb")  # never imported: no run to close
    run = wandb.run if wandb is not None else None
    if run is None:
        return None
    if summary:
        run.summary.update(summary)
    if config:
        run.config.update(config, allow_val_change=True)
    offline = run.settings.mode == "offline"
    sync_dir = run.settings.sync_dir
    run.finish()
    return f"{wandb_command()} sync {sync_dir}" if offline else None
