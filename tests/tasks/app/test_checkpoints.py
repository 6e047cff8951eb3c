"""Checkpoint files: written whole or not at all (a real SIGKILL mid-write leaves a good file),
the previous last.ckpt kept, and damage detected with an error that names the file."""

from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest
import torch

from tasks.app.atomic import atomic_write
from tasks.app.checkpoints import AtomicCheckpointIO
from tasks.app.cli import load_config
from tasks.app.config import ConfigError
from tasks.app.rundir import DamagedCheckpointError, checkpoint_problem
from tests.processes import ROOT


def save(path, value):
    atomic_write(path, lambda f: torch.save({"value": value}, f))


def load(path):
    return torch.load(path, weights_only=True)["value"]


def test_a_replaced_last_checkpoint_keeps_its_previous_version(tmp_path):
    last = tmp_path / "last.ckpt"
    save(last, 1)
    save(last, 2)
    save(tmp_path / "epoch000.ckpt", 3)
    save(tmp_path / "epoch000.ckpt", 4)
    assert load(last) == 2 and load(tmp_path / "last.prev.ckpt") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch000.ckpt",
        "last.ckpt",
        "last.prev.ckpt",
    ]


def test_a_failed_write_leaves_the_old_file(tmp_path):
    last = tmp_path / "last.ckpt"
    save(last, 1)

    def fail(f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(last, fail)
    assert load(last) == 1 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_damage_is_detected_and_named(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"w": torch.arange(1000.0)}, good)
    data = good.read_bytes()
    assert checkpoint_problem(good) is None
    cut, flipped, other = tmp_path / "cut.ckpt", tmp_path / "flipped.ckpt", tmp_path / "x.ckpt"
    cut.write_bytes(data[: len(data) - 100])
    flipped.write_bytes(data[:2000] + bytes([data[2000] ^ 0xFF]) + data[2001:])
    other.write_text("not a checkpoint")
    assert "not a complete torch checkpoint" in checkpoint_problem(cut)
    assert "CRC-32" in checkpoint_problem(flipped)
    assert "not a complete torch checkpoint" in checkpoint_problem(other)
    assert checkpoint_problem(tmp_path / "missing.ckpt") == "no such file"
    with pytest.raises(DamagedCheckpointError, match=f"{cut} is damaged"):
        AtomicCheckpointIO().load_checkpoint(cut)


def test_ckpt_last_with_no_good_checkpoint_names_each_problem(runs_dir, make_checkpoint):
    checkpoints = runs_dir / "run" / "checkpoints"
    for name in ("last.ckpt", "epoch000.ckpt"):
        make_checkpoint(checkpoints / name).write_bytes(b"torn")
    (runs_dir / "run" / "config.yaml").write_text("model:\n  pool: avg\n")
    with pytest.raises(ConfigError) as err:
        load_config((), ["ckpt=last", "name=run", f"runs_dir={runs_dir}"])
    assert "no checkpoint that can be loaded" in str(err.value)
    assert str(checkpoints / "last.ckpt") in str(err.value)
    assert str(checkpoints / "epoch000.ckpt") in str(err.value)


WRITER = """
import sys, torch
from tasks.app.atomic import atomic_write
torch.manual_seed(0)
big = torch.randn(4_000_000)  # 16 MB: most of the writer's time is spent mid-write
print("ready", flush=True)
for i in range(10**6):
    atomic_write(sys.argv[1], lambda f: torch.save({"i": i, "big": big + i}, f))
"""


@pytest.mark.slow
def test_sigkill_while_writing_never_tears_last_checkpoint(tmp_path):
    last = tmp_path / "last.ckpt"
    torch.manual_seed(0)
    big = torch.randn(4_000_000)
    for _ in range(2):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(last)], cwd=ROOT, stdout=subprocess.PIPE
        )
        assert writer.stdout.readline() == b"ready\n"
        while not last.exists():
            time.sleep(0.01)
        time.sleep(random.uniform(0.0, 0.5))
        writer.kill()  # SIGKILL
        writer.wait()
        previous = tmp_path / "last.prev.ckpt"  # there once last.ckpt has been replaced
        for path in (last, previous) if previous.exists() else (last,):
            assert checkpoint_problem(path) is None
            state = torch.load(path, weights_only=True)
            assert torch.equal(state["big"], big + state["i"]), "a mix of two versions"
