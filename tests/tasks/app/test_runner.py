"""The runner builds each task's module and sets the run's backward mode on it, once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ddn_layers import BackwardMode
from tasks.app.cli import load_config
from tasks.app.layers import declarative_layers
from tasks.app.runner import build_task_module

SHAPES = SimpleNamespace(num_classes=10, in_channels=1, descriptor_dim=0)


@pytest.mark.parametrize("task", ["classification", "matching"])
@pytest.mark.parametrize("mode", list(BackwardMode))
def test_the_run_mode_reaches_every_declarative_layer(task, mode):
    cfg = load_config((), [f"task={task}", f"ddn.backward_mode={mode.value}"])
    layers = declarative_layers(build_task_module(cfg, SHAPES))
    assert len(layers) == 1
    assert all(layer.backward_mode is mode for _, layer in layers)
