"""Lightning's checkpoint IO with files that are never torn and never read back damaged.

Saving goes through :func:`tasks.app.atomic.atomic_write` (temporary file, flush to disk,
rename; ``last.ckpt``'s previous version kept as ``last.prev.ckpt``). Loading checks the file
first (:func:`tasks.app.rundir.check_checkpoint`), so that a damaged file is reported as such,
naming it, rather than as an unpickling error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.utilities.cloud_io import get_filesystem
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO

from tasks.app.atomic import atomic_write
from tasks.app.rundir import check_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Atomic saves and checked loads for local paths; remote storage keeps Lightning's own
    transaction."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path: _PATH, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if _is_local(path) and Path(path).is_file():  # a missing file is Lightning's error
            check_checkpoint(path)
        return super().load_checkpoint(path, *args, **kwargs)


def _is_local(path: _PATH) -> bool:
    return isinstance(get_filesystem(path), LocalFileSystem)
