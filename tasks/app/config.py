"""Config schemas shared by every task (OmegaConf structured configs).

A task's schema is a subclass of :class:`RunConfig` that types its ``data`` and ``model``
sections (see ``tasks/app/registry.py``). Every field here is a key users set on the command line
(``trainer.max_epochs=5``); OmegaConf rejects unknown keys and values of the wrong type when the
sources are merged, and :func:`validate_run` checks the values whose type alone says too little
(choices, ranges). Messages name the key and list the choices.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:  # ddn_layers loads torch: a config is checked before torch is imported
    from ddn_layers import BackwardMode

# ddn.BackwardMode's values, spelled out so that checking a config needs no torch (a test keeps
# the two lists equal).
BACKWARD_MODES = ("implicit", "full", "approx", "unroll")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names every offending key."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


@dataclass
class DDNConfig:
    """Settings that apply to every declarative layer of the run."""

    backward_mode: str = "implicit"
    # Measure each declarative layer's forward/backward time and memory every N training
    # batches (0: never; nothing is hooked or synchronised then).
    profile_every_n_steps: int = 25
    # On CPU memory comes from the torch profiler, which slows the batch it records: false
    # keeps the timings only (on GPU memory is always measured).
    profile_memory: bool = True


@dataclass
class TrainerConfig:
    """Keyword arguments of ``pytorch_lightning.Trainer``, passed through unchanged.

    Fields typed ``Any`` accept Lightning's unions (``devices=2`` or ``devices=[0,1]`` or
    ``devices=auto``); :func:`validate_run` checks them.
    """

    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: Any = "32-true"
    max_epochs: int = 12
    max_steps: int = -1
    max_time: str | None = None
    fast_dev_run: Any = False
    limit_train_batches: Any = 1.0
    limit_val_batches: Any = 1.0
    limit_test_batches: Any = 1.0
    val_check_interval: Any = 1.0
    check_val_every_n_epoch: int = 1
    num_sanity_val_steps: int = 2
    log_every_n_steps: int = 10
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    sync_batchnorm: bool = False
    deterministic: Any = False
    benchmark: bool | None = None
    detect_anomaly: bool = False
    enable_progress_bar: bool = True
    enable_model_summary: bool = True
    use_distributed_sampler: bool = True
    profiler: str | None = None


@dataclass
class LoggerConfig:
    """Weights & Biases (offline unless ``online=true``) and a CSV log beside it."""

    wandb: bool = True
    online: bool = False
    project: str = "ddn-layers"
    entity: str | None = None
    # Runs are grouped by backward mode so that W&B compares modes side by side;
    # null means "<task>-<backward_mode>".
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    # Where W&B writes its run files; null means the run directory.
    save_dir: str | None = None
    csv: bool = True


@dataclass
class CheckpointConfig:
    """Which checkpoints a run keeps; ``last.ckpt`` (what ``ckpt=last`` resumes) is rewritten
    at the end of every ``every_n_epochs``-th epoch and, when ``every_n_steps`` > 0, every that
    many optimiser steps as well, so that a killed run loses at most those steps."""

    # null: the task's own metric (val/acc for classification).
    monitor: str | None = None
    mode: str | None = None
    save_top_k: int = 1
    every_n_epochs: int = 1
    # 0: no step checkpoints, only the per-epoch ones.
    every_n_steps: int = 0


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    scheduler: str = "cosine"
    warmup_epochs: int = 0


@dataclass
class RunConfig:
    """The keys every task shares. Tasks subclass it to type ``data`` and ``model``."""

    task: str = "classification"
    seed: int = 0
    # Run directory is <runs_dir>/<name>; null name means "<task>-<mode>-<timestamp>".
    name: str | None = None
    runs_dir: str = "runs"
    # Resume: "last" (the newest run, or the run called `name`), or a checkpoint path.
    ckpt: str | None = None
    # Evaluate the best checkpoint on the test split after fitting.
    test: bool = True
    ddn: DDNConfig = field(default_factory=DDNConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: Any = None
    model: Any = None


OPTIMIZERS = ("adamw", "adam", "sgd")
# Lightning's registered strategies, spelled out so that checking a config needs no Lightning
# import (a test keeps the list equal to StrategyRegistry.available_strategies()).
STRATEGIES = (
    "ddp",
    "ddp_find_unused_parameters_false",
    "ddp_find_unused_parameters_true",
    "ddp_fork",
    "ddp_fork_find_unused_parameters_false",
    "ddp_fork_find_unused_parameters_true",
    "ddp_notebook",
    "ddp_notebook_find_unused_parameters_false",
    "ddp_notebook_find_unused_parameters_true",
    "ddp_spawn",
    "ddp_spawn_find_unused_parameters_false",
    "ddp_spawn_find_unused_parameters_true",
    "deepspeed",
    "deepspeed_stage_1",
    "deepspeed_stage_2",
    "deepspeed_stage_2_offload",
    "deepspeed_stage_3",
    "deepspeed_stage_3_offload",
    "deepspeed_stage_3_offload_nvme",
    "fsdp",
    "fsdp_cpu_offload",
    "single_device",
    "single_tpu",
    "single_xla",
    "xla",
    "xla_debug",
)
SCHEDULERS = ("cosine", "none")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")
PRECISIONS = (
    "64-true",
    "32-true",
    "16-mixed",
    "bf16-mixed",
    "16-true",
    "bf16-true",
    "64",
    "32",
    "16",
    "bf16",
    64,
    32,
    16,
)


def check_choice(cfg: DictConfig, key: str, choices: Any, problems: list[str]) -> None:
    """Append a message to ``problems`` unless the value at dotted ``key`` is in ``choices``
    (with the closest choice when the value looks like a typo of it)."""
    value = _select(cfg, key)
    choices = list(choices)
    if value not in choices:
        problems.append(f"{key}={value!r} is not one of {choices}{did_you_mean(value, choices)}")


def did_you_mean(value: Any, choices: list[Any]) -> str:
    """``"; did you mean 'x'?"`` for the choice closest to ``value``, or ``""``."""
    if not isinstance(value, str):
        return ""
    names = {str(c).lower(): c for c in choices}
    hint = difflib.get_close_matches(value.lower(), list(names), n=1, cutoff=0.6)
    return f"; did you mean {names[hint[0]]!r}?" if hint else ""


def check_range(
    cfg: DictConfig,
    key: str,
    problems: list[str],
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> None:
    """Append a message unless ``low <= value <= high`` (``low < value`` when ``low_open``)."""
    value = _select(cfg, key)
    if value is None:
        return
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" <= {high}"
        problems.append(f"{key}={value!r} must satisfy {lo}{key.split('.')[-1]}{hi}")


def check_layer_options(
    cfg: DictConfig, key: str, layer: str, problems: list[str], **fixed: Any
) -> None:
    """Append a message naming ``key`` unless ``ddn_layers.<layer>(**fixed, **options)``
    builds, where ``options`` is the mapping at ``key``: a typo in them fails now rather than
    mid-run. Without options nothing is built, so that a config is checked before torch loads
    (the fixed values have their own checks)."""
    options = OmegaConf.to_container(_select(cfg, key))
    if not options:
        return
    import ddn_layers

    try:
        getattr(ddn_layers, layer)(**fixed, **options)
    except (TypeError, ValueError) as err:
        problems.append(f"{key}={options}: {err}")


def backward_mode(cfg: DictConfig) -> BackwardMode:
    """The run's ``ddn.backward_mode`` as the enum the layers take (checked by validate_run)."""
    from ddn_layers import BackwardMode

    return BackwardMode(cfg.ddn.backward_mode)


def _select(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_batches(cfg: DictConfig, key: str, problems: list[str]) -> None:
    # Lightning reads an int as a number of batches and a float as a fraction of the loader.
    value = _select(cfg, key)
    if _is_int(value) and value >= 0:
        return
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return
    problems.append(f"{key}={value!r} must be a batch count (int >= 0) or a fraction in [0, 1]")


def _is_max_time(value: object) -> bool:
    parts = str(value).split(":")
    return len(parts) == 4 and all(p.isdigit() for p in parts)


def _check_trainer(cfg: DictConfig, problems: list[str]) -> None:
    _check_launch(cfg, problems)
    _check_loops(cfg, problems)


def _devices_ok(devices: Any) -> bool:
    return (
        (_is_int(devices) and devices >= -1)
        or devices == "auto"
        or (isinstance(devices, str) and all(p.strip().isdigit() for p in devices.split(",")))
        or (hasattr(devices, "__len__") and all(_is_int(d) and d >= 0 for d in devices))
    )


def _check_launch(cfg: DictConfig, problems: list[str]) -> None:
    """Where the run's processes go: accelerator, precision, strategy, devices, nodes."""
    t = cfg.trainer
    check_choice(cfg, "trainer.accelerator", ACCELERATORS, problems)
    check_choice(cfg, "trainer.precision", PRECISIONS, problems)
    check_choice(cfg, "trainer.strategy", ["auto", *STRATEGIES], problems)
    if isinstance(t.strategy, str) and "spawn" in t.strategy:
        # spawned processes log into loggers and callbacks the parent never sees: the test
        # stage then fails in the CSV logger after the whole fit
        problems.append(
            f"trainer.strategy={t.strategy!r}: spawn strategies are not supported; use ddp "
            "(configs/ddp.yaml), which launches the processes itself"
        )
    if not _devices_ok(t.devices):
        problems.append(
            f"trainer.devices={t.devices!r} must be a count (int, -1 for all), 'auto', "
            "or a list of device indices"
        )
    if t.sync_batchnorm and t.accelerator == "cpu":
        problems.append(
            "trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm is CUDA-only)"
        )
    check_range(cfg, "trainer.num_nodes", problems, low=1)


def _check_loops(cfg: DictConfig, problems: list[str]) -> None:
    """How long the loops run and what they do on the way: epochs, batches, validation."""
    t = cfg.trainer
    if t.max_time is not None and not _is_max_time(t.max_time):
        problems.append(f"trainer.max_time={t.max_time!r} must be DD:HH:MM:SS, e.g. 00:12:00:00")
    if not (isinstance(t.fast_dev_run, bool) or (_is_int(t.fast_dev_run) and t.fast_dev_run >= 0)):
        problems.append(f"trainer.fast_dev_run={t.fast_dev_run!r} must be true/false or a count")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        _check_batches(cfg, f"trainer.{key}", problems)
    if not (
        (_is_int(t.val_check_interval) and t.val_check_interval >= 1)
        or (isinstance(t.val_check_interval, float) and 0.0 < t.val_check_interval <= 1.0)
    ):
        problems.append(
            f"trainer.val_check_interval={t.val_check_interval!r} must be a batch count "
            "(int >= 1) or a fraction in (0, 1]"
        )
    if t.deterministic not in (True, False, "warn"):
        problems.append(
            f"trainer.deterministic={t.deterministic!r} is not one of [true, false, 'warn']"
        )
    if t.profiler is not None:
        check_choice(cfg, "trainer.profiler", ["simple", "advanced", "pytorch", "xla"], problems)
    check_range(cfg, "trainer.max_epochs", problems, low=-1)
    check_range(cfg, "trainer.accumulate_grad_batches", problems, low=1)
    check_range(cfg, "trainer.log_every_n_steps", problems, low=1)
    check_range(cfg, "trainer.check_val_every_n_epoch", problems, low=1)


def validate_run(cfg: DictConfig) -> list[str]:
    """Problems with the shared sections (the task validates its own ``data`` and ``model``)."""
    problems: list[str] = []
    check_choice(cfg, "ddn.backward_mode", BACKWARD_MODES, problems)
    check_range(cfg, "ddn.profile_every_n_steps", problems, low=0)
    _check_trainer(cfg, problems)
    check_choice(cfg, "optim.name", OPTIMIZERS, problems)
    check_choice(cfg, "optim.scheduler", SCHEDULERS, problems)
    check_range(cfg, "optim.lr", problems, low=0.0, low_open=True)
    check_range(cfg, "optim.weight_decay", problems, low=0.0)
    check_range(cfg, "optim.warmup_epochs", problems, low=0)
    if cfg.checkpoint.mode is not None:
        check_choice(cfg, "checkpoint.mode", ["min", "max"], problems)
    elif cfg.checkpoint.monitor is not None:
        # the task's own mode belongs to the task's own metric: for a loss it would keep
        # the worst checkpoint as the best
        problems.append(
            f"checkpoint.monitor={cfg.checkpoint.monitor!r} needs checkpoint.mode: min or max"
        )
    check_range(cfg, "checkpoint.save_top_k", problems, low=-1)
    check_range(cfg, "checkpoint.every_n_epochs", problems, low=1)
    check_range(cfg, "checkpoint.every_n_steps", problems, low=0)
    # the range Lightning's seed_everything takes
    check_range(cfg, "seed", problems, low=0, high=2**32 - 1)
    if cfg.name is not None and (not cfg.name or "/" in cfg.name or cfg.name in (".", "..")):
        problems.append(f"name={cfg.name!r} must be a plain directory name (no '/')")
    return problems
