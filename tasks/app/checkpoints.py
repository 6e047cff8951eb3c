"""Checkpoint files that are never torn, and a check that tells a damaged one from a good one.

Every checkpoint is written to a temporary file beside its target, flushed to disk, then renamed
over it: a process killed at any moment leaves the old file or the new one, never a mix. When
``last.ckpt`` is replaced, its previous version stays as ``last.prev.ckpt`` (a hard link: no
copy), so that a ``last.ckpt`` damaged afterwards on disk still has a good predecessor.

Loading a checkpoint checks it first (:func:`tasks.app.rundir.check_checkpoint`), so that a damaged
file is reported as such rather than as an unpickling error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.utilities.cloud_io import get_filesystem
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO

from tasks.app.rundir import LAST_CHECKPOINT, PREVIOUS_LAST_CHECKPOINT, check_checkpoint


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def atomic_save(checkpoint: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temporary file in ``path``'s directory, then rename it over ``path``;
    a ``last.ckpt`` being replaced is kept as ``last.prev.ckpt``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        if path.name == LAST_CHECKPOINT and path.is_file():
            _keep_previous(path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def _keep_previous(path: Path) -> None:
    # Link first, rename second: last.ckpt exists at every moment.
    previous = path.with_name(PREVIOUS_LAST_CHECKPOINT)
    link = path.with_name(f".{PREVIOUS_LAST_CHECKPOINT}.{os.getpid()}.tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
        os.replace(link, previous)
    except OSError:  # a filesystem without hard links: no previous version then
        link.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with :func:`atomic_save` for local paths (remote storage keeps
    Lightning's own transaction) and a clear error for a damaged checkpoint."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: _PATH, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if _is_local(path) and Path(path).is_file():  # a missing file is Lightning's error
            check_checkpoint(path)
        return super().load_checkpoint(path, *args, **kwargs)


def _is_local(path: _PATH) -> bool:
    return isinstance(get_filesystem(path), LocalFileSystem)
