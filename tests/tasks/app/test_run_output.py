"""What a run tells its user: no library noise, statistics that say what they rest on, paths
that can be copied as printed, where a resumed run starts, that a finished run is finished, and
why a backward mode cannot train a task."""

from __future__ import annotations

import json
import os
import warnings

import pytest

import ddn_layers as ddn
from tasks.app.cli import load_config
from tasks.app.quiet import CppNoteFilter, LayerWarnings
from tasks.app.registry import get_task
from tasks.app.runner import _warn_if_unsuitable, run
from tasks.app.stats import spread

# Lines the libraries printed on a default run before they were filtered at their source.
NOISE = (
    "anonymous setting has no effect",
    "`resume` will be ignored",
    "litlogger",
    "was configured so",
    "LeafSpec",
    "CPUAllocator",
    "Memory block of unknown size",
    "Total FLOPs",
    "TPU available",
    "exists and is not empty",
    "Trainer already configured",
    "estimate number of stepping batches",
)
# A digits run of a few seconds: 8 training batches are a warm-up, 5 timed, 1 for memory, 1.
SHORT = ["model.width=4", "trainer.max_epochs=1", "trainer.limit_train_batches=8"]


def test_spread_of_measurements():
    assert spread([4.0, 1.0, 3.0, 2.0, 5.0]) == {"median": 3.0, "p25": 2.0, "p75": 4.0, "n": 5}
    assert spread([7.0]) == {"median": 7.0, "p25": 7.0, "p75": 7.0, "n": 1}
    with pytest.raises(ValueError, match="values"):
        spread([])


def test_a_short_run_is_quiet_and_says_what_its_figures_rest_on(
    runs_dir, capfd, recwarn, monkeypatch
):
    monkeypatch.delenv("WANDB_SILENT", raising=False)  # what W&B itself prints is checked too
    overrides = [f"runs_dir={runs_dir}", "name=short", "trainer.enable_progress_bar=false"]
    results = run(load_config((), [*overrides, *SHORT]))
    out, err = capfd.readouterr()
    for noise in NOISE:
        assert noise not in out + err, noise
    assert not [w for w in recwarn if "LeafSpec" in str(w.message)]

    summary = json.loads((runs_dir / "short" / "summary.json").read_text())
    for name in ("fwd_ms", "bwd_ms", "fwd_cpu_ms", "bwd_cpu_ms"):
        stats = summary[f"ddn/net_pool/{name}"]
        assert stats["n"] == 5 and stats["p25"] <= stats["median"] <= stats["p75"], name
        assert results[f"ddn/net_pool/{name}"] == stats["median"]
    assert summary["ddn/net_pool/bwd_peak_mib"]["n"] == 1
    assert summary["test/acc"] == results["test/acc"]
    assert summary["layers"]["net_pool"]["type"] == "RobustPool2d"
    # the end-of-run table says how many steps each figure rests on
    assert "n steps" in out and "p25" in out
    # the upload command and the checkpoint on lines of their own, as they can be pasted
    lines = out.splitlines()
    (sync,) = [line.strip() for line in lines if " sync " in line]
    program, _, path = sync.split(" ")
    assert program.endswith("wandb") and os.access(program, os.X_OK) and os.path.isdir(path)
    assert os.path.isfile(lines[lines.index("Best checkpoint:") + 1].strip())
    check_resume_messages(runs_dir, capfd, recwarn)


def check_resume_messages(runs_dir, capfd, recwarn):
    """ckpt=last on the finished run ``short``, then with a larger budget."""
    logs = sorted((runs_dir / "short" / "csv").iterdir())
    again = run(load_config((), [f"runs_dir={runs_dir}", "ckpt=last", "name=short"]))
    out = capfd.readouterr().out
    assert "run short already finished: epoch 1, step 8" in out
    assert f"{runs_dir / 'short' / 'summary.json'}" in out and "trainer.max_epochs=" in out
    assert sorted((runs_dir / "short" / "csv").iterdir()) == logs, "no log folder added"
    saved = json.loads((runs_dir / "short" / "results.json").read_text())
    assert again["test/acc"] == saved["test/acc"]

    longer = ["ckpt=last", "name=short", "trainer.max_epochs=2", "logger.wandb=false"]
    recwarn.clear()
    run(load_config((), [f"runs_dir={runs_dir}", *longer]))
    out, err = capfd.readouterr()
    assert "resuming short from epoch 1, step 8 (checkpoint " in out
    for noise in NOISE:
        assert noise not in out + err, noise
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]
    # the steps timed before the resume count too (and testing the best checkpoint, which
    # restores the callbacks' states, does not take them back)
    summary = json.loads((runs_dir / "short" / "summary.json").read_text())
    assert summary["ddn/net_pool/fwd_ms"]["n"] == 10


def test_a_mode_that_cannot_train_the_task_is_a_one_line_warning(capsys):
    cfg = load_config((), ["task=matching", "ddn.backward_mode=approx"])
    _warn_if_unsuitable(cfg, {"approx": "its gradient has no minimum"})
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "warning: ddn.backward_mode=approx cannot train the matching task: its gradient has no "
        "minimum (use another mode)"
    ]
    _warn_if_unsuitable(load_config((), ["task=matching"]), {"approx": "no"})
    assert capsys.readouterr().err == ""
    # the matching task declares it: approx's OT gradient cannot train its NLL on log P
    assert "approx" in get_task("matching").unsuitable_modes


def test_cpp_notes_are_dropped_and_other_lines_kept(capfd):
    with CppNoteFilter(("unknown size",)):
        os.write(2, b"[W] Memory block of unknown size was allocated\nreal problem\n")
    assert capfd.readouterr().err == "real problem\n"


def test_layer_warnings_are_explained_once_and_counted(capsys):
    with LayerWarnings() as layer_warnings:
        for _ in range(3):
            warnings.warn("2 of 8 samples did not converge", ddn.ConvergenceWarning, 1)
        warnings.warn("something else", UserWarning, 1)
    err = capsys.readouterr().err
    assert err.count("did not converge") == 1 and "what it means" in err
    assert layer_warnings.report() == [
        "ConvergenceWarning: 3 times in this run (the first is shown above)"
    ]
