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


def hyperparameters(cfg: DictConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """What the loggers record as the run's config: the resolved config plus provenance."""
    params = OmegaConf.to_container(cfg, resolve=True)
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


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    log = cfg.logger
    loggers: list[Logger] = []
    if log.wandb:
        import wandb  # here, not at the top: a run without W&B need not pay for importing it

        mode = cfg.ddn.backward_mode
        loggers.append(
            WandbLogger(
                name=cfg.name,
                project=log.project,
                entity=log.entity,
                group=log.group or f"{cfg.task}-{mode}",
                tags=[cfg.task, mode, *log.tags],
                job_type=cfg.task,
                save_dir=str(log.save_dir or run_dir),
                id=_wandb_id(run_dir),
                offline=not log.online,
                mode="online" if log.online else "offline",
                # W&B's own end-of-run printout repeats what the run summary shows.
                settings=wandb.Settings(quiet=True),
            )
        )
    if log.csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv"))
    return loggers


def finish_wandb() -> str | None:
    """Close this process's W&B run, so that another run can start in it (tests, sweeps);
    returns the command that uploads it when it was offline."""
    wandb = sys.modules.get("wandb")  # never imported: no run to close
    run = wandb.run if wandb is not None else None
    if run is None:
        return None
    offline = run.settings.mode == "offline"
    sync_dir = run.settings.sync_dir
    run.finish()
    return f"wandb sync {sync_dir}" if offline else None
