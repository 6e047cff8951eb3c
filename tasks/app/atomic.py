"""Files that are replaced whole or not at all: a process killed at any moment while writing one
leaves the old version or the new one, never a mix of the two.

The new contents go to a temporary file beside the target, are flushed to disk, and the file is
renamed over the target (a rename within a directory is atomic). A ``last.ckpt`` being replaced
stays as ``last.prev.ckpt`` (a hard link: nothing is copied), so that a ``last.ckpt`` damaged
later on disk still has a good predecessor.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from tasks.app.rundir import LAST_CHECKPOINT, PREVIOUS_LAST_CHECKPOINT


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Replace the file at ``path`` by what ``write`` writes to the binary file it is given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
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


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; some filesystems cannot sync a directory, and the
    # rename is atomic all the same.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
