"""Where a run keeps its files, and how a resumed run finds them again.

Layout of ``<runs_dir>/<name>/``: ``config.yaml`` (the resolved config), ``run.json`` (git
commit, backward mode, versions), ``results.json`` and ``summary.json`` (written when the run
ends: its results, and the measured statistics with their spread), ``checkpoints/``
(``last.ckpt``, its previous version ``last.prev.ckpt``, and the best), ``wandb/`` (offline
W&B run files) and ``csv/`` (the CSV log).

A torch checkpoint is a zip archive with a CRC-32 for every member: :func:`checkpoint_problem`
reads them all, which catches a file cut short (no central directory) and altered bytes, without
unpickling anything (this module stays light: config errors come back before torch loads).
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tasks.app.config import ConfigError

CONFIG_FILE = "config.yaml"
METADATA_FILE = "run.json"
SUMMARY_FILE = "summary.json"
RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
PREVIOUS_LAST_CHECKPOINT = "last.prev.ckpt"

# Lightning's "ddp" strategy starts the other ranks by re-running train.py with the same
# arguments; they read the run name from here so that all ranks agree on the run directory.
RUN_NAME_ENV = "DDN_RUN_NAME"


class DamagedCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read back as it was written."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(
            f"checkpoint {path} is damaged ({problem}): it was cut short or altered after it was "
            "written"
        )
        self.path = Path(path)
        self.problem = problem


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be loaded, or None when every byte checks out."""
    path = Path(path)
    if not path.is_file():
        return "no such file"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"not a complete torch checkpoint: {err}"
    if bad is not None:
        return f"the CRC-32 of member {bad!r} does not match its bytes"
    if not any(name.endswith("data.pkl") for name in names):
        return "not a torch checkpoint: no data.pkl in the archive"
    return None


def check_checkpoint(path: str | Path) -> None:
    """Raise :class:`DamagedCheckpointError` unless the checkpoint at ``path`` checks out."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise DamagedCheckpointError(path, problem)


def _shared_stamp() -> str | None:
    # Every process of a multi-node job sees the same job id; a torchrun rendezvous id
    # (--rdzv-id) likewise, unless it is the default "none" of a static rendezvous.
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return f"slurm{job}"
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID")
    if rdzv and rdzv != "none":
        return f"torchrun-{rdzv}"
    return None


def new_run_name(task: str, backward_mode: str) -> str:
    """``<task>-<mode>-<stamp>``; the stamp is the SLURM job id or torchrun's rendezvous id when
    there is one, so that every process of a job picks the same name without talking to the
    others; otherwise the time. A torchrun job with neither must be given ``name=``."""
    stamp = _shared_stamp()
    if stamp is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "name: launched by torchrun with several processes and no --rdzv-id, each process "
            "would name its own run directory; give every process the same name=..."
        )
    return f"{task}-{backward_mode}-{stamp or time.strftime('%Y%m%d-%H%M%S')}"


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    """``last.ckpt``, then the run's other checkpoints from the most recently written."""
    others = [p for p in (run_dir / CHECKPOINT_DIR).glob("*.ckpt") if p.name != LAST_CHECKPOINT]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    last = last_checkpoint(run_dir)
    return ([last] if last.is_file() else []) + others


def resume_checkpoint(run_dir: Path) -> tuple[Path, list[str]]:
    """The newest checkpoint of ``run_dir`` that checks out, and what is wrong with each newer
    one that was passed over; ConfigError when none checks out."""
    passed_over: list[str] = []
    for path in checkpoints_newest_first(run_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, passed_over
        passed_over.append(str(DamagedCheckpointError(path, problem)))
    raise ConfigError(
        [f"ckpt=last: run {run_dir.name!r} has no checkpoint that can be loaded", *passed_over]
    )


def find_resumable_run(runs_dir: str, name: str | None) -> Path:
    """The run directory ``ckpt=last`` resumes: run ``name``, or the one saved most recently."""
    root = Path(runs_dir)
    if name is not None:
        run_dir = root / name
        if not checkpoints_newest_first(run_dir):
            raise ConfigError(
                f"ckpt=last: run {name!r} has no {last_checkpoint(run_dir)} "
                "(it never wrote a checkpoint, or name= is wrong)"
            )
        return run_dir
    candidates = [
        p.parent.parent for p in root.glob(f"*/{CHECKPOINT_DIR}/{LAST_CHECKPOINT}") if p.is_file()
    ]
    if not candidates:
        raise ConfigError(f"ckpt=last: no run under {str(root)!r} has a {LAST_CHECKPOINT} yet")
    return max(candidates, key=lambda d: last_checkpoint(d).stat().st_mtime)


# The trainer settings that decide how long a run trains.
BUDGET_KEYS = ("max_epochs", "max_steps", "max_time", "limit_train_batches")


def budget(cfg: DictConfig) -> dict[str, Any]:
    """How long the run trains: the ``trainer.`` values of :data:`BUDGET_KEYS`."""
    return {k: OmegaConf.to_container(cfg.trainer)[k] for k in BUDGET_KEYS}


def finished_run(cfg: DictConfig) -> dict[str, Any] | None:
    """The saved summary of the run that ``cfg`` resumes when that run already finished with
    the same budget (its summary is newer than its checkpoint); None when there is training or
    testing left to do."""
    if cfg.ckpt is None:
        return None
    run_dir = Path(cfg.runs_dir) / cfg.name
    ckpt, summary_path = Path(cfg.ckpt), run_dir / SUMMARY_FILE
    # only a resume from the run's newest state: an older checkpoint is a deliberate rewind
    if ckpt != last_checkpoint(run_dir) or not summary_path.is_file():
        return None
    if not (run_dir / RESULTS_FILE).is_file():
        return None
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("budget") != budget(cfg):
        return None
    if ckpt.stat().st_mtime > summary_path.stat().st_mtime:
        return None
    return summary
