"""The tasks ``train.py`` can run: ``task=<name>`` -> schema, data module and LightningModule.

A task is a package under ``tasks/`` exposing ``TASK = TaskSpec(...)``, with its schema (the
one :class:`RunConfig` subclass) and ``validate`` in ``<package>/config.py``. Adding one is a
line in ``_TASKS``; its package is imported only when a run asks for it, so a task with heavy or
missing optional dependencies never slows down or breaks the others. Checking a config needs
only the task's ``config.py`` (:func:`get_task_config`), so that a bad config is reported before
the task's models, data and Lightning are imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
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
    package = importlib.import_module(_TASKS[name])
    # a config.py loaded alone by get_task_config is reused, but not bound to the package
    config = sys.modules.get(f"{_TASKS[name]}.config")
    if config is not None and not hasattr(package, "config"):
        package.config = config
    spec = package.TASK
    if not isinstance(spec, TaskSpec) or spec.name != name:
        raise TypeError(f"{_TASKS[name]}.TASK must be the TaskSpec named {name!r}")
    return spec


@dataclass(frozen=True)
class TaskConfig:
    """What checking a config of a task needs: its schema and its ``validate``."""

    schema: type[RunConfig]
    validate: Callable[[DictConfig], list[str]]


def get_task_config(name: str) -> TaskConfig:
    """The schema and ``validate`` of task ``name`` from its ``config.py`` alone, without
    running the package's ``__init__`` (which imports its models and Lightning): the module is
    loaded under its own name, so the package reuses it when a run imports the package."""
    if name not in _TASKS:
        raise ConfigError(f"task={name!r} is not one of {task_names()}")
    module_name = f"{_TASKS[name]}.config"
    module = sys.modules.get(module_name)
    if module is None:
        package = importlib.util.find_spec(_TASKS[name])
        if package is None or not package.submodule_search_locations:
            raise TypeError(f"{_TASKS[name]} must be a package with a config.py")
        location = f"{list(package.submodule_search_locations)[0]}/config.py"
        spec = importlib.util.spec_from_file_location(module_name, location)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except ImportError:
            # a config.py that imports from its own package needs the package first: the
            # ordinary import (any real import error comes back from it)
            sys.modules.pop(module_name, None)
            module = importlib.import_module(module_name)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
    schemas = [
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, RunConfig) and v.__module__ == module_name
    ]
    if len(schemas) != 1 or not callable(getattr(module, "validate", None)):
        raise TypeError(f"{module_name} must define one RunConfig subclass and validate()")
    return TaskConfig(schemas[0], module.validate)
