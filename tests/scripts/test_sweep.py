"""The backward-mode sweep: real train.py runs (tiny budgets), CSV, figure, README, W&B files."""

from __future__ import annotations

import json
import math

import pytest
import yaml

TINY = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "ddn.profile_every_n_steps=1",
    "model.width=4",
]


@pytest.mark.usefixtures("scripts_on_path")
def test_grid_runs_pools_without_a_mode_once():
    import sweep

    modes = ["implicit", "unroll"]
    assert sweep.grid("classification", modes, ["avg", "max", "robust"]) == [
        ("avg", "none"),
        ("max", "none"),
        ("robust", "implicit"),
        ("robust", "unroll"),
    ]
    assert sweep.grid("matching", modes, ["avg"]) == [("", "implicit"), ("", "unroll")]


@pytest.mark.usefixtures("scripts_on_path")
def test_overrides_may_follow_list_options():
    import sweep

    args = sweep.parse_args(["--task", "matching", "--modes", "full", "trainer.max_epochs=2"])
    assert args.modes == ["full"] and args.overrides == ["trainer.max_epochs=2"]
    assert str(args.config) == "configs/sweep_matching.yaml"
    assert str(args.out) == "docs/benchmarks/sweeps/matching"


@pytest.mark.slow
@pytest.mark.usefixtures("scripts_on_path")
def test_sweep_end_to_end_with_wandb_offline(tmp_path):
    import plot_sweep
    import sweep

    out, runs = tmp_path / "out", tmp_path / "runs"
    rows = sweep.main(
        ["--task", "classification", "--pools", "avg", "robust", "--modes", "implicit",
         "--config", "none", "--out", str(out), "--runs-dir", str(runs), *TINY]
    )  # fmt: skip
    assert [(r["pool"], r["mode"]) for r in rows] == [("avg", "none"), ("robust", "implicit")]
    avg, robust = rows
    for r in rows:
        assert 0.0 <= r["test_metric"] <= 1.0 and r["train_step_ms"] > 0 and r["epochs"] == 1
    assert math.isnan(avg["bwd_ms"]) and avg["layers"] == ""
    assert robust["layers"] == "net_pool" and robust["bwd_ms"] > 0 and robust["bwd_peak_mib"] > 0

    # CSV + meta + figure + README, and the figure and README redrawn from the CSV alone
    csv_rows = plot_sweep.load_rows(out / "sweep.csv")
    assert [plot_sweep.label(r) for r in csv_rows] == ["avg", "robust/implicit"]
    meta = json.loads((out / "sweep.meta.json").read_text())
    assert meta["command"].startswith("python ") and meta["cpu_count"] >= 1
    assert "shared" in meta and meta["sweep_seconds"] > 0
    readme = (out / "README.md").read_text()
    assert plot_sweep.markdown_table(csv_rows) in readme and "![sweep](sweep.png)" in readme
    (out / "sweep.png").unlink()
    plot_sweep.main(["--csv", str(out / "sweep.csv")])
    assert (out / "sweep.png").stat().st_size > 0

    # one offline W&B run per training run, grouped by mode, plus the summary with its media
    for r in rows:
        run_dir = runs / r["run"]
        (offline,) = (run_dir / "wandb").glob("offline-run-*")
        assert list(offline.glob("*.wandb"))
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        group = "classification-avg" if r["pool"] == "avg" else "classification-implicit"
        assert saved["logger"]["group"] == group and meta["sweep_id"] in saved["logger"]["tags"]
        assert saved["seed"] == 0 and saved["model"]["pool"] == r["pool"]
    (summary,) = (runs / meta["sweep_id"] / "wandb").glob("offline-run-*")
    media = {p.suffix for p in (summary / "files" / "media").rglob("*") if p.is_file()}
    assert ".png" in media and ".json" in media  # the figure and the table
