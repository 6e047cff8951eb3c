"""Where a run keeps its files, and how a resumed run finds them again.

Layout of ``<runs_dir>/<name>/``: ``config.yaml`` (the resolved config), ``run.json`` (git
commit, backward mode, versions), ``checkpoints/`` (``last.ckpt`` plus the best),
``wandb/`` (offline W&B run files) and ``csv/`` (the CSV log).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tasks.app.config import ConfigError

CONFIG_FILE = "config.yaml"
METADATA_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"

# Lightning's "ddp" strategy starts the other ranks by re-running train.py with the same
# arguments; they read the run name from here so that all ranks agree on the run directory.
RUN_NAME_ENV = "DDN_RUN_NAME"


def new_run_name(task: str, backward_mode: str) -> str:
    """``<task>-<mode>-<stamp>``; the stamp is the SLURM job id when there is one, so that
    every task of a multi-node job picks the same name without talking to the others."""
    job = os.environ.get("SLURM_JOB_ID")
    stamp = f"slurm{job}" if job else time.strftime("%Y%m%d-%H%M%S")
    return f"{task}-{backward_mode}-{stamp}"


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT


def find_resumable_run(runs_dir: str, name: str | None) -> Path:
    """The run directory ``ckpt=last`` resumes: run ``name``, or the one saved most recently."""
    root = Path(runs_dir)
    if name is not None:
        run_dir = root / name
        if not last_checkpoint(run_dir).is_file():
            raise ConfigError(
                f"ckpt=last: run {name!r} has no {last_checkpoint(run_dir)} "
                "(it never finished an epoch, or name= is wrong)"
            )
        return run_dir
    candidates = [
        p.parent.parent for p in root.glob(f"*/{CHECKPOINT_DIR}/{LAST_CHECKPOINT}") if p.is_file()
    ]
    if not candidates:
        raise ConfigError(f"ckpt=last: no run under {str(root)!r} has a {LAST_CHECKPOINT} yet")
    return max(candidates, key=lambda d: last_checkpoint(d).stat().st_mtime)
