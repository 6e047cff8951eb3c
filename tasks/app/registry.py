"""The tasks ``train.py`` can run: ``task=<name>`` -> schema, data module and LightningModule.

A task is a package under ``tasks/`` exposing ``TASK = TaskSpec(...)``. Adding one is a line in
``_TASKS``; its package is imported only when a run asks for it, so a task with heavy or
missing optional dependencies never slows down or breaks the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from tasks.app.config import ConfigError, RunConfig

if TYPE_CHECKING:  # Lightning is heavy to import; config errors should come back fast
    import pytorch_lightning as pl

# task name -> module that defines TASK
_TASKS: dict[str, str] = {
    "classification": "tasks.classification",
    "matching": "tasks.matching",
}


@dataclass(frozen=True)
class TaskSpec:
    """Everything the harness needs to know about a task.

    ``schema``: a :class:`RunConfig` subclass typing the task's ``data`` and ``model``
    sections (its defaults are the task's defaults). ``validate`` returns problems with those
    sections, each naming its key; it runs before anything is built, so it also checks that
    data roots exist. ``build_datamodule(cfg)`` and ``build_module(cfg, datamodule)`` build the
    run; the module receives the data module so it can read shapes such as the class count.
    ``monitor``/``monitor_mode``: the validation metric that picks the best checkpoint.
    ``summary``: metric names shown in the end-of-run table. ``unsuitable_modes``: backward
    mode -> why it cannot train this task's loss; a run in such a mode starts with a warning
    that gives the reason.
    """

    name: str
    schema: type[RunConfig]
    validate: Callable[[DictConfig], list[str]]
    build_datamodule: Callable[[DictConfig], pl.LightningDataModule]
    build_module: Callable[[DictConfig, pl.LightningDataModule], pl.LightningModule]
    monitor: str
    monitor_mode: str = "max"
    summary: tuple[str, ...] = field(default_factory=tuple)
    unsuitable_modes: dict[str, str] = field(default_factory=dict)


def task_names() -> list[str]:
    return list(_TASKS)


def get_task(name: str) -> TaskSpec:
    """The spec of task ``name``; ConfigError naming ``task`` and the choices otherwise."""
    if name not in _TASKS:
        raise ConfigError(f"task={name!r} is not one of {task_names()}")
    spec = importlib.import_module(_TASKS[name]).TASK
    if not isinstance(spec, TaskSpec) or spec.name != name:
        raise TypeError(f"{_TASKS[name]}.TASK must be the TaskSpec named {name!r}")
    return spec
