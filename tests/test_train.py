"""End-to-end runs of train.py: every backward mode and pool, the files a run leaves, W&B
offline, the command line's failures, and two node ranks under torchrun. DDP on two CPU processes
and resuming killed runs: tests/tasks/app/test_resume.py."""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import train
from tasks.app.cli import build_parser, load_config
from tasks.app.runner import run

ROOT = Path(__file__).resolve().parents[1]
MODES = ["implicit", "full", "approx", "unroll"]
# A run of a second or two on a shared 2-core machine: a 4-channel CNN.
SMALL = ["model.width=4", "data.batch_size=32"]


def quick(quiet: list[str], *overrides: str) -> dict:
    return run(load_config((), [*quiet, *SMALL, *overrides]))


def train_py(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("mode", MODES)
def test_fast_dev_run_robust_pool_in_every_mode(quiet, runs_dir, mode):
    results = quick(quiet, "trainer.fast_dev_run=true", f"ddn.backward_mode={mode}")
    assert 0.0 <= results["test/acc"] <= 1.0
    # the profiler measured the pool in this mode (first batch)
    assert results["ddn/net_pool/bwd_ms"] > 0
    assert results["ddn/net_pool/bwd_peak_mib"] > 0
    assert not any(runs_dir.iterdir()), "fast_dev_run writes no run files"


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_fast_dev_run_plain_pools(quiet, pool):
    results = quick(quiet, "trainer.fast_dev_run=true", f"model.pool={pool}")
    assert 0.0 <= results["test/acc"] <= 1.0
    assert not any(k.startswith("ddn/") for k in results), "no declarative layer to profile"


def test_fast_dev_run_resnet(quiet):
    results = quick(quiet, "trainer.fast_dev_run=true", "model.arch=resnet18", "data.batch_size=4")
    assert 0.0 <= results["test/acc"] <= 1.0


def test_run_files_and_wandb_offline(quiet, runs_dir):
    results = quick(
        quiet,
        "name=logged",
        "logger.wandb=true",
        "ddn.backward_mode=unroll",
        "ddn.profile_every_n_steps=1",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.log_every_n_steps=1",
    )
    run_dir = runs_dir / "logged"
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.ddn.backward_mode == "unroll" and saved.name == "logged"
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["backward_mode"] == "unroll" and re.fullmatch(
        r"[0-9a-f]{40}", meta["git"]["commit"]
    )
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((run_dir / "results.json").read_text())["test/acc"] == results["test/acc"]
    metrics_csv = (run_dir / "csv" / "version_0" / "metrics.csv").read_text()
    for name in ("ddn/net_pool/fwd_ms", "ddn/net_pool/bwd_peak_mib", "val/acc", "train/loss"):
        assert name in metrics_csv

    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (records,) = offline.glob("run-*.wandb")
    data = records.read_bytes()
    for name in ("ddn/net_pool/fwd_ms", "ddn/net_pool/bwd_ms", "ddn/net_pool/bwd_peak_mib",
                 "ddn/net_pool/iters_mean", "ddn/net_pool/residual_max", "test/acc",
                 "classification-unroll", "git_commit", "RobustPool2d", "ddn_layer_shapes",
                 "ddn/net_pool/fwd_ms_p25", "ddn/net_pool/fwd_ms_n"):  # fmt: skip
        assert name.encode() in data, name
    assert (run_dir / "wandb_id").read_text().strip() in offline.name


def test_docstring_and_readme_commands_are_valid(runs_dir, make_checkpoint):
    # Every `train.py ...` command in train.py's docstring and in the README's code blocks
    # parses and validates, and each calls the project's Python (runnable without activation).
    resumable = runs_dir / "classification-implicit-20250101-120000"
    make_checkpoint(resumable / "checkpoints" / "last.ckpt")
    (resumable / "config.yaml").write_text("model:\n  pool: avg\n")
    text = train.__doc__.replace("\\\n", " ")
    lines = [line for line in text.splitlines() if "train.py " in line and "[" not in line]
    readme = (ROOT / "README.md").read_text().replace("\\\n", " ")
    lines += [line.split("#")[0] for line in readme.splitlines() if line.startswith(".venv/bin/")]
    lines = [line for line in lines if "train.py " in line]
    assert len(lines) >= 18
    for line in lines:
        assert ".venv/bin/" in line, line
    commands = [line.split("train.py", 1)[1] for line in lines]
    for command in commands:
        args = build_parser().parse_args(shlex.split(command) + [f"runs_dir={runs_dir}"])
        overrides = (
            [*args.overrides, "model.pool=avg"] if "ckpt=last" not in command else args.overrides
        )
        load_config(args.config, overrides)


def test_bad_config_exits_before_training(tmp_path):
    runs = tmp_path / "runs"
    proc = train_py(f"runs_dir={runs}", "data.dataset=mnist", "model.pool=median", timeout=120)
    assert proc.returncode == 2
    assert "data.dataset='mnist'" in proc.stderr and "model.pool='median'" in proc.stderr
    assert not runs.exists(), "nothing may be written before the config is valid"


def test_main_returns_2_and_prints_config(capsys):
    assert train.main(["ddn.backward_mode=sideways"]) == 2
    assert "ddn.backward_mode='sideways'" in capsys.readouterr().err
    assert train.main(["trainer.max_epoch=1"]) == 2
    assert "did you mean trainer.max_epochs" in capsys.readouterr().err
    assert train.main(["--print-config", "model.pool=avg", "seed=3"]) == 0
    assert "seed: 3" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.ddp
def test_two_node_ranks_on_one_host_with_torchrun(quiet, runs_dir, tmp_path):
    # What --help and the README give for several nodes, with both node ranks on this host.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                "--master-addr=127.0.0.1", f"--master-port={_free_port()}"]  # fmt: skip
    args = ["train.py", *quiet, *SMALL, "trainer.num_nodes=2", "trainer.devices=1",
            "trainer.strategy=ddp", "name=two-nodes", "trainer.max_epochs=1",
            "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
            "trainer.limit_test_batches=2", "ddn.profile_every_n_steps=0"]  # fmt: skip
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = []
    for rank, log in enumerate(logs):
        with open(log, "wb") as err:
            command = [*torchrun, f"--node-rank={rank}", *args]
            nodes.append(subprocess.Popen(command, cwd=ROOT, stdout=err, stderr=err))
    try:
        for node, log in zip(nodes, logs, strict=True):
            assert node.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        for node in nodes:
            node.kill()
    assert "MEMBER: 1/2" in logs[0].read_text() and "MEMBER: 2/2" in logs[1].read_text()
    (run_dir,) = runs_dir.iterdir()  # both nodes wrote into one run directory
    results = json.loads((run_dir / "results.json").read_text())
    assert 0.0 <= results["test/acc"] <= 1.0
    saved = OmegaConf.load(run_dir / "config.yaml").trainer
    assert (saved.num_nodes, saved.devices, saved.strategy) == (2, 1, "ddp")


def test_help_and_config_checks_import_neither_torch_nor_lightning():
    # --help loads nothing heavy; a config of either task is checked and printed before
    # torch, Lightning and the task's models are imported.
    script = (
        "import sys, train\n"
        "assert 'torch' not in sys.modules\n"
        "assert train.main(['model.penalty=welch']) == 2\n"
        "assert train.main(['--print-config']) == 0\n"
        "assert train.main(['task=matching', 'model.transport=dustbn']) == 2\n"
        "assert train.main(['task=matching', '--print-config']) == 0\n"
        "heavy = {'torch', 'pytorch_lightning', 'lightning_fabric', 'torchvision', 'wandb'}\n"
        "assert not heavy & set(sys.modules), heavy & set(sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "did you mean 'welsch'?" in proc.stderr
    assert "backward_mode: implicit" in proc.stdout
