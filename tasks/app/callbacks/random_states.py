"""The global random generators of every process, saved in each checkpoint and restored on resume.

Python's ``random``, NumPy's global generator, torch's CPU generator and every CUDA device's
generator: whatever the model draws during training (dropout, a layer's random restarts) comes
from these. The data pipeline does not draw from them (see tasks/app/sampling.py), so their
states at a checkpoint are their states at the start of the next training batch.

The states are restored at the start of the first training batch after loading, not when the
checkpoint is read: whatever Lightning or a callback draws while the run is being set up then
cannot shift the streams. Under DDP each process saves and gets back its own.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from tasks.app.distributed import gather, mine


def capture() -> dict[str, Any]:
    """This process's generator states, in types that ``torch.load(weights_only=True)`` reads
    (Lightning loads the best checkpoint for testing that way)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 - the global one
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RandomStates(pl.Callback):
    """Save every process's generator states with each checkpoint; restore them on resume."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": gather(capture())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = mine(state_dict["ranks"], "random states")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            restore(self._pending)
            self._pending = None
