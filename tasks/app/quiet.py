"""What a run prints: the libraries' lines that do not concern the user's run are dropped where
they come from, and the layers' own warnings are explained once per run.

- Lightning's info lines about settings left at their defaults, adverts and internals
  (:data:`LIGHTNING_NOISE`): a filter on Lightning's ``rank_zero`` loggers, which print them.
- The deprecation Lightning's pytree helper triggers in torch (nothing a user can change).
- The torch profiler's C++ note that a block allocated before it started was freed, printed
  while the CPU memory of a layer is measured: :class:`CppNoteFilter` around that batch.
- :class:`LayerWarnings`: the first :class:`~ddn_layers.ConvergenceWarning` and
  :class:`~ddn_layers.IllConditionedWarning` of a run are shown with what they mean; the rest
  are counted, and :meth:`LayerWarnings.report` gives the counts at the end.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import warnings
from collections import Counter
from typing import Any, TextIO

LIGHTNING_NOISE = (
    r"💡 Tip: For seamless cloud logging",
    r"`Trainer\((limit_\w+|val_check_interval)=1\.0\)` was configured",
    r"TPU available: False",
    r"HPU available: False",
    r"Loading `\w+_dataloader` to estimate number of stepping batches",
    r"Trainer already configured with model summary callbacks",
)
_NOISE = re.compile("|".join(f"(?:{p})" for p in LIGHTNING_NOISE))
_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")
CPP_NOTES = ("Memory block of unknown size was allocated before the profiling started",)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _NOISE.search(record.getMessage())


_FILTER = _DropNoise()


def silence_library_noise() -> None:
    """Install the filters (idempotent); nothing else a library says is touched."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=Warning
    )
    # Lightning suggests DataLoader workers; for in-memory datasets (digits) they cost more
    # than they save, and data.num_workers is there for the others.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # The first checkpoint callback is the one that keeps the best (see checkpoint_callbacks).
    warnings.filterwarnings("ignore", ".*configured with multiple `ModelCheckpoint` callbacks.*")
    # Lightning looks for the position in the epoch in the loader; DataPosition keeps it and
    # the data module starts from it, so a mid-epoch resume does continue with the next batch.
    warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*")


class CppNoteFilter:
    """Within the block, what C++ code writes to the process's stderr (file descriptor 2) is
    held back, and written out at the end without the lines that hold one of ``notes``."""

    def __init__(self, notes: tuple[str, ...] = CPP_NOTES) -> None:
        self.notes = notes
        self._saved: int | None = None
        self._held: Any = None

    def __enter__(self) -> CppNoteFilter:
        try:
            sys.stderr.flush()
            self._held = tempfile.TemporaryFile()
            self._saved = os.dup(2)
            os.dup2(self._held.fileno(), 2)
        except (OSError, ValueError):  # no real descriptor 2 (an embedding host): leave it
            self._restore()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._saved is None:
            if self._held is not None:
                self._held.close()
                self._held = None
            return
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._saved = None
        self._held.seek(0)
        kept = [
            line
            for line in self._held.read().splitlines(keepends=True)
            if not any(note.encode() in line for note in self.notes)
        ]
        self._held.close()
        self._held = None
        if kept:
            os.write(2, b"".join(kept))


# What each of the layers' warnings means for a training run, said once.
MEANINGS = {
    "ConvergenceWarning": (
        "the forward solver stopped at max_iter before reaching tol on some samples: their "
        "outputs (and gradients) are approximate; ddn/<layer>/converged_frac and residual_max "
        "show how many and how far (raise the layer's max_iter or loosen tol in model.*)"
    ),
    "IllConditionedWarning": (
        "the implicit backward met a singular or indefinite system on some samples (a "
        "minimiser that is not unique) and gave them a zero gradient instead of NaN"
    ),
}


class LayerWarnings:
    """Shows the first warning of each kind in :data:`MEANINGS` with its meaning and counts
    the others; other warnings pass through untouched. Use as a context manager."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.counts: Counter[str] = Counter()
        self.stream = stream
        self._previous: Any = None
        self._filters: Any = None

    def __enter__(self) -> LayerWarnings:
        self._previous = warnings.showwarning
        self._filters = warnings.filters[:]
        for name in MEANINGS:
            # every occurrence reaches showwarning, which decides what to print
            warnings.filterwarnings("always", message="", category=_category(name))
        warnings.showwarning = self._show
        return self

    def __exit__(self, *exc: Any) -> None:
        warnings.showwarning = self._previous
        warnings.filters[:] = self._filters

    def _show(self, message: Any, category: type, filename: str, lineno: int, *rest: Any):
        name = category.__name__
        if name not in MEANINGS:
            return self._previous(message, category, filename, lineno, *rest)
        self.counts[name] += 1
        if self.counts[name] == 1:
            stream = self.stream or sys.stderr
            print(f"warning: {name}: {message}\n  what it means: {MEANINGS[name]}", file=stream)
        return None

    def report(self) -> list[str]:
        """One line per kind shown more than once: how many times it came in the run."""
        return [
            f"{name}: {count} times in this run (the first is shown above)"
            for name, count in sorted(self.counts.items())
            if count > 1
        ]


def _category(name: str) -> type[Warning]:
    import ddn_layers  # here: importing it loads torch, which the config check must not wait for

    return getattr(ddn_layers, name)
