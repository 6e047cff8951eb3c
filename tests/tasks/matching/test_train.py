"""The matching task through train.py's machinery: a smoke run in every backward mode (with
the baselines in the results and the OT layer profiled), the shipped config, and bad configs
failing before anything is built, naming the key."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest

from tasks.app.cli import load_config
from tasks.app.config import ConfigError
from tasks.app.registry import get_task
from tasks.app.runner import build_task_module, run

# A run of a second or two: a tiny encoder on tiny sets.
TINY = [
    "task=matching",
    "model.dim=8",
    "model.heads=2",
    "model.layers=1",
    "data.batch_size=4",
    "data.train_size=8",
    "data.val_size=4",
    "data.test_size=4",
    "data.synthetic.min_inliers=5",
    "data.synthetic.max_inliers=9",
]


def fails(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config((), ["task=matching", *overrides])
    return str(info.value)


@pytest.mark.parametrize("mode", ["implicit", "full", "approx", "unroll"])
def test_fast_dev_run_in_every_mode(quiet, mode):
    overrides = ["trainer.fast_dev_run=true", f"ddn.backward_mode={mode}"]
    cfg = load_config((), [*quiet, *TINY, *overrides])
    results = run(cfg)
    for key in ("test/f1", "test/precision", "test/recall", "test/nn_f1", "test/hungarian_f1"):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["test/loss"] > 0
    # the profiler found the Sinkhorn layer and measured its backward in this mode
    assert results["ddn/net_ot/bwd_ms"] > 0
    assert results["ddn/net_ot/bwd_peak_mib"] > 0


# Photographs at the smallest sizes: a few steps of a CNN on 7 x 7 patches.
TINY_IMAGES = [
    "data.source=images",
    "data.images.crop=48",
    "data.images.short_side=64",
    "data.images.max_keypoints=12",
    "data.images.patch=7",
    "model.descriptor=cnn",
    "model.channels=2",
    "model.normalize=none",
    "model.knn=0",
]


def test_images_train_end_to_end_with_every_baseline_in_the_csv(quiet, runs_dir):
    overrides = ["trainer.max_epochs=1", "data.train_size=8", "name=images"]
    cfg = load_config(["configs/matching_images.yaml"], [*quiet, *TINY, *TINY_IMAGES, *overrides])
    results = run(cfg)
    names = ("nn", "hungarian", "patch_nn", "descriptor_nn")
    for key in ("test/f1", *(f"test/{name}_f1" for name in names)):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["val/f1"] >= 0.0 and results["test/loss"] > 0
    with open(runs_dir / "images" / "csv" / "version_0" / "metrics.csv") as f:
        logged = set(next(csv.reader(f)))
    assert {f"test/{name}_f1" for name in names} <= logged


def test_unbalanced_transport_trains(quiet):
    overrides = ["trainer.fast_dev_run=true", "model.transport=unbalanced", "model.rho=0.5"]
    results = run(load_config((), [*quiet, *TINY, *overrides]))
    assert 0.0 <= results["test/f1"] <= 1.0 and results["test/loss"] > 0


def test_shipped_config_and_task_spec():
    cfg = load_config(["configs/matching.yaml"], [])
    assert cfg.task == "matching" and cfg.model.normalize == "whiten"
    assert cfg.data.synthetic.outlier_fraction == 0.2 and list(cfg.data.warp.kinds) == ["affine"]
    assert load_config((), ["task=matching"]).name.startswith("matching-implicit-")
    spec = get_task("matching")
    assert spec.monitor == "val/f1" and "test/hungarian_f1" in spec.summary
    assert "test/patch_nn_f1" in spec.summary and "test/descriptor_nn_f1" in spec.summary
    images = load_config(["configs/matching_images.yaml"], [])
    assert images.data.source == "images" and images.model.descriptor == "cnn"
    splits = [set(images.data.images[f"{s}_images"]) for s in ("train", "val", "test")]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    # the sweep's budget repeats the setting (a sweep reads one file), only shorter
    sweep = load_config(["configs/sweep_matching_images.yaml"], [])
    for key in ("data", "model", "optim"):
        assert sweep[key] == images[key], key
    assert sweep.trainer.max_epochs < images.trainer.max_epochs


@pytest.mark.parametrize("radial_frame", [True, False])
def test_model_keys_reach_the_network(radial_frame):
    cfg = load_config(
        (),
        [
            *TINY,
            f"model.radial_frame={radial_frame}",
            "model.normalize=center",
            "model.knn=5",
            "model.gamma=7.5",
            "ddn.backward_mode=unroll",
        ],
    )
    net = build_task_module(cfg, SimpleNamespace(descriptor_dim=0)).net
    assert net.radial_frame is radial_frame and net.local.radial_frame is radial_frame
    assert net.normalize == "center" and net.local.k == 5
    assert len(net.self_attn) == len(net.cross_attn) == 1
    assert net.ot.gamma == 7.5 and net.ot.backward_mode.value == "unroll"


def test_bad_values_name_their_key():
    assert "data.warp.kinds: 'shear' is not one of" in fails("data.warp.kinds=[affine,shear]")
    assert "data.source='video'" in fails("data.source=video")
    assert "model.normalize='sphere'" in fails("model.normalize=sphere")
    assert "model.dim=30 must be a multiple of model.heads=4" in fails("model.dim=30")
    assert "data.synthetic.outlier_fraction" in fails("data.synthetic.outlier_fraction=1.0")
    assert "data.synthetic.max_inliers" in fails("data.synthetic.max_inliers=3")
    assert "model.gamma" in fails("model.gamma=0")
    assert "baselines.max_distance" in fails("baselines.max_distance=-1.0")
    assert "data.images.test_images: 'lena'" in fails("data.images.test_images=[lena]")
    assert "model.transport='dustpan'" in fails("model.transport=dustpan")
    assert "model.rho" in fails("model.rho=0")


def test_options_that_do_not_fit_together():
    msg = fails("data.source=images", "data.warp.kinds=[nonrigid]")
    assert "data.warp.kinds" in msg and "cannot resample an image" in msg
    assert "model.ot_kwargs" in fails("model.ot_kwargs={no_such_option: 1}")
    assert "model.ot_kwargs.log_plan: set by the model" in fails("model.ot_kwargs={log_plan: 0}")
    assert "data.images.patch=4 must be odd" in fails("data.images.patch=4")


def test_unknown_key_is_named():
    assert "model.dims" in fails("model.dims=8")
    assert "baselines.enable" in fails("baselines.enable=false")
