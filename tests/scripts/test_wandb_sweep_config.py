"""The W&B sweep configurations: they parse, and every command the agent would run is a valid
train.py config (keys known to the task's schema, values accepted), checked without W&B."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from tasks.app.cli import load_config
from tasks.app.loggers import _wandb_id

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = {
    "classification": "sweep_classification.yaml",
    "matching": "sweep_matching.yaml",
}


def _agent_argv(spec: dict, params: dict) -> list[str]:
    """The arguments after ``python train.py`` that ``wandb agent`` builds for one grid point
    (wandb's own macro expansion)."""
    expanded = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    argv = []
    for chunk in spec["command"]:
        if chunk in ("${env}", "${interpreter}", "${program}"):
            continue
        if chunk.startswith("${"):
            argv += expanded[chunk[2:-1]]
        else:
            argv.append(str(chunk))
    return argv


@pytest.mark.parametrize("task", list(SWEEPS))
def test_wandb_sweep_grid_is_valid_train_config(task, tmp_path):
    spec = yaml.safe_load((ROOT / "configs" / "wandb_sweeps" / SWEEPS[task]).read_text())
    assert spec["program"] == "train.py" and (ROOT / spec["program"]).is_file()
    assert spec["method"] == "grid" and "${args_no_hyphens}" in spec["command"]
    assert spec["metric"]["name"] == ("test/acc" if task == "classification" else "test/f1")
    params = spec["parameters"]
    assert params["ddn.backward_mode"]["values"] == ["implicit", "full", "approx", "unroll"]
    if task == "classification":
        assert set(params["model.pool"]["values"]) == {"avg", "max", "robust"}
    keys = list(params)
    choices = [p["values"] if "values" in p else [p["value"]] for p in params.values()]
    for combo in itertools.product(*choices):
        argv = _agent_argv(spec, dict(zip(keys, combo, strict=True)))
        files = [argv[i + 1] for i, a in enumerate(argv) if a == "-c"]
        overrides = [a for a in argv if "=" in a]
        assert len(files) + len(overrides) + len(files) == len(argv)
        cfg = load_config([str(ROOT / f) for f in files], [*overrides, f"runs_dir={tmp_path}"])
        assert cfg.task == task and cfg.logger.online is True
        for key, value in zip(keys, combo, strict=True):
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert node == value, key


def test_wandb_run_id_follows_the_agent(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun1")
    assert _wandb_id(tmp_path / "a") == "agentrun1"
    monkeypatch.delenv("WANDB_RUN_ID")
    assert _wandb_id(tmp_path / "a") == "agentrun1"  # a resumed run keeps its id
    assert _wandb_id(tmp_path / "b") != "agentrun1"
