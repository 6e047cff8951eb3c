"""Config loading: sources merge in order, and every bad config fails before training with
a message that names the key (and lists the choices where there are some)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import pytorch_lightning as pl
from omegaconf import OmegaConf

from tasks.app import rundir
from tasks.app.cli import load_config
from tasks.app.config import ConfigError, TrainerConfig
from tasks.app.registry import get_task, task_names

AVG = ["model.pool=avg"]


def fails(*overrides: str, files: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(files, list(overrides))
    return str(info.value)


def test_trainer_keys_are_trainer_arguments():
    # trainer.* is passed to Trainer(**...) unchanged: every key must be one of its arguments.
    params = inspect.signature(pl.Trainer.__init__).parameters
    schema = OmegaConf.structured(TrainerConfig)
    assert set(schema.keys()) <= set(params)


def test_defaults_are_the_offline_digits_robust_run():
    cfg = load_config()
    assert cfg.task == "classification"
    assert cfg.data.dataset == "digits"
    assert cfg.model.pool == "robust"
    assert cfg.ddn.backward_mode == "implicit"
    assert cfg.trainer.accelerator == "cpu"
    assert not cfg.logger.online
    assert cfg.name.startswith("classification-implicit-")


def test_overrides_win_over_files_in_order(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("trainer:\n  max_epochs: 3\ndata:\n  batch_size: 8\n")
    b = tmp_path / "b.yaml"
    b.write_text("trainer:\n  max_epochs: 4\n")
    cfg = load_config([str(a), str(b)], [*AVG, "data.batch_size=16", "trainer.devices=[0,1]"])
    assert cfg.trainer.max_epochs == 4
    assert cfg.data.batch_size == 16
    assert list(cfg.trainer.devices) == [0, 1]
    assert OmegaConf.is_readonly(cfg)


def test_every_backward_mode_is_accepted():
    for mode in ("implicit", "full", "approx", "unroll"):
        assert load_config((), [*AVG, f"ddn.backward_mode={mode}"]).ddn.backward_mode == mode


def test_shipped_configs_load():
    configs = sorted(Path("configs").glob("*.yaml"))
    assert configs
    for path in configs:
        assert "None" not in path.read_text(), f"{path}: write null, not None"
        # Classification keys only for its own configs (and those that name no task);
        # download=true: a CIFAR config would otherwise (rightly) ask for the archive.
        task = OmegaConf.load(path).get("task", "classification")
        overrides = [*AVG, "data.download=true"] if task == "classification" else []
        load_config([str(path)], overrides)


def test_unknown_key_names_it_and_suggests():
    msg = fails(*AVG, "trainer.max_epoch=3")
    assert "trainer.max_epoch" in msg and "did you mean trainer.max_epochs" in msg
    msg = fails(*AVG, "bogus=1")
    assert "bogus: unknown key" in msg and "'trainer'" in msg
    assert "model.poool" in fails("model.poool=avg")


def test_wrong_type_names_the_key():
    msg = fails(*AVG, "trainer.max_epochs=many")
    assert "trainer.max_epochs" in msg
    assert "data.batch_size" in fails(*AVG, "data.batch_size=1.5")


def test_a_bad_backward_mode_is_reported_once_for_either_task():
    for task in ((), ("task=matching",)):
        msg = fails(*task, "ddn.backward_mode=magic")
        assert msg.count("backward_mode") == 1, msg


def test_trainer_values_lightning_would_reject_late_are_caught_first():
    assert "spawn strategies are not supported" in fails(*AVG, "trainer.strategy=ddp_spawn")
    assert "trainer.max_time='abc' must be DD:HH:MM:SS" in fails(*AVG, "trainer.max_time=abc")
    load_config((), [*AVG, "trainer.max_time=00:00:10:00"])


def test_a_monitor_of_ones_own_needs_its_direction():
    assert "needs checkpoint.mode: min or max" in fails(*AVG, "checkpoint.monitor=val/loss")
    cfg = load_config((), [*AVG, "checkpoint.monitor=val/loss", "checkpoint.mode=min"])
    assert cfg.checkpoint.mode == "min"


def test_unknown_choices_are_listed():
    msg = fails(*AVG, "ddn.backward_mode=magic")
    assert "ddn.backward_mode='magic'" in msg
    assert "['implicit', 'full', 'approx', 'unroll']" in msg
    msg = fails(*AVG, "data.dataset=mnist")
    assert "data.dataset='mnist'" in msg and "'digits'" in msg and "'imagefolder'" in msg
    assert "'avg', 'max', 'robust'" in fails("model.pool=median")
    assert "'small_cnn'" in fails(*AVG, "model.arch=vgg")
    assert "['classification'" in fails("task=segmentation")
    assert "trainer.strategy='dpp'" in fails(*AVG, "trainer.strategy=dpp")
    assert "'bf16-mixed'" in fails(*AVG, "trainer.precision=8")


def test_unknown_penalty_is_listed():
    msg = fails("model.penalty=cauchy")
    assert "model.penalty='cauchy'" in msg and "'welsch'" in msg


def test_bad_pool_option_fails_at_config_time():
    assert "model.pool_kwargs" in fails("model.pool_kwargs={no_such_option: 1}")


def test_bad_values_name_their_key():
    assert "trainer.limit_train_batches" in fails(*AVG, "trainer.limit_train_batches=1.5")
    assert "data.corrupt.fraction" in fails(*AVG, "data.corrupt.fraction=2.0")
    assert "data.corrupt.splits" in fails(*AVG, "data.corrupt.splits=[tests]")
    assert "optim.lr" in fails(*AVG, "optim.lr=0")
    assert "trainer.devices" in fails(*AVG, "trainer.devices=some")


def test_several_problems_are_reported_together():
    msg = fails("model.pool=median", "data.dataset=mnist", "ddn.backward_mode=x")
    assert "model.pool" in msg and "data.dataset" in msg and "ddn.backward_mode" in msg


def test_missing_data_roots(tmp_path):
    msg = fails(*AVG, "data.dataset=cifar10", f"data.root={tmp_path}")
    assert "data.root=" in msg and "cifar-10-batches-py" in msg and "data.download=true" in msg
    msg = fails(*AVG, "data.dataset=imagefolder", f"data.root={tmp_path / 'nowhere'}")
    assert "data.root=" in msg and "no such directory" in msg


def test_yaml_none_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("logger:\n  group: None\n")
    assert "logger.group: write null, not None" in fails(*AVG, files=(str(bad),))
    assert "write null" in fails(*AVG, "logger.entity=None")


def test_file_and_override_syntax_errors(tmp_path):
    assert "no such file" in fails(files=(str(tmp_path / "missing.yaml"),))
    assert "expected key=value" in fails("trainer.max_epochs")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert "mapping" in fails(files=(str(listing),))
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer: [1, 2\n")
    assert "not a valid YAML config" in fails(files=(str(broken),))


def test_ckpt_errors(runs_dir):
    assert "no run under" in fails(*AVG, "ckpt=last", f"runs_dir={runs_dir}")
    assert "has no" in fails(*AVG, "ckpt=last", "name=gone", f"runs_dir={runs_dir}")
    assert "no such checkpoint" in fails(*AVG, f"ckpt={runs_dir / 'x.ckpt'}")


def test_ckpt_last_reloads_the_saved_config(runs_dir, make_checkpoint):
    old = runs_dir / "old"
    make_checkpoint(old / "checkpoints" / "last.ckpt")
    OmegaConf.save(OmegaConf.create({"model": {"pool": "max"}, "seed": 7}), old / "config.yaml")
    cfg = load_config((), ["ckpt=last", f"runs_dir={runs_dir}", "trainer.max_epochs=30"])
    assert cfg.name == "old" and cfg.seed == 7 and cfg.model.pool == "max"
    assert cfg.trainer.max_epochs == 30
    assert cfg.ckpt == str(rundir.last_checkpoint(old))


def test_run_name_comes_from_the_environment_for_relaunched_ranks(monkeypatch):
    monkeypatch.setenv(rundir.RUN_NAME_ENV, "shared-name")
    assert load_config((), AVG).name == "shared-name"
    assert load_config((), [*AVG, "name=mine"]).name == "mine"


def test_torchrun_processes_agree_on_the_run_name(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # a static rendezvous
    assert "give every process the same name=" in fails(*AVG)
    assert load_config((), [*AVG, "name=two-nodes"]).name == "two-nodes"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")  # --rdzv-id=job7
    assert load_config((), AVG).name == "classification-implicit-torchrun-job7"


def test_checkpoint_and_seed_keys_are_checked():
    assert "checkpoint.every_n_steps=-1" in fails(*AVG, "checkpoint.every_n_steps=-1")
    assert "did you mean checkpoint.every_n_steps" in fails(*AVG, "checkpoint.every_n_step=5")
    assert "seed=-1" in fails(*AVG, "seed=-1")
    assert load_config((), [*AVG, "checkpoint.every_n_steps=50"]).checkpoint.every_n_steps == 50


def test_registry():
    assert "classification" in task_names()
    spec = get_task("classification")
    assert spec.monitor == "val/acc"
    with pytest.raises(ConfigError, match="task='nope'"):
        get_task("nope")


def test_the_spelled_out_lists_match_the_libraries():
    from pytorch_lightning.strategies import StrategyRegistry

    from ddn_layers import PENALTIES, BackwardMode
    from tasks.app.config import BACKWARD_MODES, STRATEGIES
    from tasks.classification.config import PENALTIES as PENALTY_NAMES

    assert list(BACKWARD_MODES) == list(BackwardMode.choices())
    assert sorted(PENALTY_NAMES) == sorted(PENALTIES)
    assert sorted(STRATEGIES) == sorted(StrategyRegistry.available_strategies())


def test_a_value_typo_gets_the_closest_choice():
    message = fails("model.penalty=welch", "optim.name=adamm", "trainer.strategy=dpp")
    assert "model.penalty='welch' is not one of" in message
    assert "did you mean 'welsch'?" in message and "did you mean 'adam'?" in message
    assert "did you mean 'ddp'?" in message
    assert "did you mean" not in fails(*AVG, "ddn.backward_mode=sideways")


def test_the_task_config_is_the_one_the_task_package_uses():
    # config checks load <task>/config.py alone; the package must reuse that module
    from tasks.app.registry import get_task_config

    for name in task_names():
        assert get_task_config(name).schema is get_task(name).schema
