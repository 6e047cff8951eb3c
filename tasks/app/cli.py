"""Command line -> validated run config: ``[-c FILE ...] [key=value ...]``.

Sources merge left to right over the task's schema: the saved config of the run being resumed
(``ckpt=last``), then each ``-c`` file, then the ``key=value`` overrides. Every problem is
reported as a :class:`~tasks.app.config.ConfigError` naming the key, before anything is built.

``ckpt=last`` resumes the run's newest checkpoint that checks out (``last.ckpt`` unless it is
damaged on disk: then, with a :class:`ResumeWarning` naming it, the newest good one before it);
a ``ckpt=PATH`` that is damaged is an error.
"""

from __future__ import annotations

import argparse
import difflib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from tasks.app import rundir
from tasks.app.config import ConfigError, RunConfig, validate_run
from tasks.app.registry import TaskConfig, get_task_config


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="YAML config merged over the defaults (repeatable; later files win)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML and exit without training",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    return parser


def load_config(files: Sequence[str] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """The validated, read-only config of a run; ConfigError on any problem."""
    sources = [_load_file(f, f"-c {f}") for f in files]
    sources.append(_parse_overrides(overrides))
    peek = OmegaConf.merge(*sources)

    resumed: DictConfig | None = None
    resume_dir: Path | None = None
    if peek.get("ckpt") == "last":
        runs_dir = peek.get("runs_dir", RunConfig.runs_dir)
        name = peek.get("name") or os.environ.get(rundir.RUN_NAME_ENV)
        resume_dir = rundir.find_resumable_run(runs_dir, name)
        saved = resume_dir / rundir.CONFIG_FILE
        resumed = _load_file(str(saved), f"ckpt=last: the saved config {saved}")

    task = peek.get("task") or (resumed.get("task") if resumed else None) or RunConfig.task
    if not isinstance(task, str):
        raise ConfigError(f"task={task!r} must be a task name")
    spec = get_task_config(task)
    cfg = _merge(spec, [s for s in (resumed, *sources) if s is not None])

    problems = validate_run(cfg) + spec.validate(cfg)
    if problems:
        raise ConfigError(problems)

    if resume_dir is not None:
        cfg.name = resume_dir.name
        cfg.ckpt = str(_newest_good_checkpoint(resume_dir))
    elif cfg.ckpt is not None:
        if not Path(cfg.ckpt).is_file():
            raise ConfigError(f"ckpt={cfg.ckpt!r}: no such checkpoint file (or use ckpt=last)")
        problem = rundir.checkpoint_problem(cfg.ckpt)
        if problem is not None:
            damaged = rundir.DamagedCheckpointError(cfg.ckpt, problem)
            raise ConfigError(f"ckpt={cfg.ckpt!r}: {damaged}")
    if cfg.name is None:
        cfg.name = os.environ.get(rundir.RUN_NAME_ENV) or rundir.new_run_name(
            cfg.task, cfg.ddn.backward_mode
        )
    OmegaConf.set_readonly(cfg, True)
    return cfg


class ResumeWarning(UserWarning):
    """``ckpt=last`` passed over a damaged checkpoint for an older one."""


def _newest_good_checkpoint(run_dir: Path) -> Path:
    path, passed_over = rundir.resume_checkpoint(run_dir)
    for problem in passed_over:
        warnings.warn(f"ckpt=last: {problem}; resuming from {path} instead", ResumeWarning, 2)
    return path


def _load_file(path: str, label: str) -> DictConfig:
    if not Path(path).is_file():
        raise ConfigError(f"{label}: no such file")
    try:
        conf = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as err:
        raise ConfigError(f"{label}: not a valid YAML config: {err}") from err
    if not isinstance(conf, DictConfig):
        raise ConfigError(f"{label}: must hold a mapping of keys, got a list")
    _reject_python_none(conf, f"{label}: ")
    return conf


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" not in item or not key or key.startswith("-"):
            raise ConfigError(f"{item!r}: expected key=value (for example trainer.max_epochs=5)")
    try:
        conf = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"could not parse overrides {list(overrides)}: {err}") from err
    _reject_python_none(conf, "")
    return conf


def _reject_python_none(conf: DictConfig, where: str) -> None:
    # YAML reads `None` as the string "None", which would quietly pass for a name or a path.
    for key, value in _leaves(OmegaConf.to_container(conf, resolve=False)):
        if value == "None":
            raise ConfigError(f"{where}{key}: write null, not None")


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in node.items()]
    elif isinstance(node, list):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(node)]
    else:
        return [(prefix, node)]
    return [leaf for key, value in items for leaf in _leaves(value, key)]


def _merge(spec: TaskConfig, sources: list[DictConfig]) -> DictConfig:
    schema = OmegaConf.structured(spec.schema)
    try:
        return OmegaConf.merge(schema, *sources)
    except ConfigKeyError as err:
        raise ConfigError(_unknown_key_message(schema, err.full_key)) from err
    except OmegaConfBaseException as err:
        key = err.full_key or "config"
        raise ConfigError(f"{key}: {str(err.msg).splitlines()[0]}") from err


def _unknown_key_message(schema: DictConfig, full_key: str) -> str:
    parent, _, leaf = full_key.rpartition(".")
    node = OmegaConf.select(schema, parent) if parent else schema
    known = list(node.keys()) if isinstance(node, DictConfig) else []
    hint = difflib.get_close_matches(leaf, known, n=1, cutoff=0.75)
    did_you_mean = f"; did you mean {parent + '.' if parent else ''}{hint[0]}?" if hint else ""
    where = f"keys of {parent}" if parent else "top-level keys"
    return f"{full_key}: unknown key{did_you_mean} ({where}: {known})"
