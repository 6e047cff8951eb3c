"""Shared fixtures: seeded, CPU-only, loggers offline, a runs directory for training runs."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

# Offline W&B and no telemetry for every test, before anything imports wandb.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 - seeds legacy global state that libraries still use
    torch.manual_seed(0)
    yield


@pytest.fixture
def single_thread():
    """One intra-op thread for tests of many tiny solves: there threads only add a barrier per
    op, and on a loaded 2-core machine each barrier can wait a scheduler slice (~10 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cpu() -> torch.device:
    return torch.device("cpu")


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    """An empty ``runs_dir`` for training runs."""
    d = tmp_path / "runs"
    d.mkdir()
    return d


@pytest.fixture
def quiet(runs_dir) -> list[str]:
    """Overrides of a test run: no progress bar, model summary or W&B; files under runs_dir."""
    return [
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logger.wandb=false",
        f"runs_dir={runs_dir}",
    ]


@pytest.fixture
def make_checkpoint():
    """``make_checkpoint(path)`` writes a small torch checkpoint that checks out, for tests of
    how runs and checkpoints are found (no training needed)."""

    def write(path: Path, **contents) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": 0, **contents}, path)
        return path

    return write


@pytest.fixture(scope="session")
def train_processes():
    """Starts ``train.py`` runs as real processes without re-importing torch for each (see
    tests/processes.py)."""
    from tests.processes import TrainProcesses

    processes = TrainProcesses()
    yield processes
    processes.close()


# Property-based tests explore new examples locally but replay a fixed set in CI, so that a
# landing never depends on luck.
try:
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    if os.environ.get("CI"):
        _hyp_settings.load_profile("ci")
except ImportError:  # hypothesis is a dev extra
    pass
