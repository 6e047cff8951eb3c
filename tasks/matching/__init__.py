"""Keypoint set matching with Sinkhorn optimal transport and a learnable dustbin."""

from tasks.app.registry import TaskSpec
from tasks.matching.config import MatchingRun, validate
from tasks.matching.data import MatchingData
from tasks.matching.module import MatchingModule, build_module

TASK = TaskSpec(
    name="matching",
    schema=MatchingRun,
    validate=validate,
    build_datamodule=lambda cfg: MatchingData(cfg.data, cfg.seed),
    build_module=build_module,
    monitor="val/f1",
    monitor_mode="max",
    unsuitable_modes={"approx": "its gradient of the NLL on log P has no minimum: F1 falls to 0"},
    summary=(
        "val/f1",
        "test/precision",
        "test/recall",
        "test/f1",
        "test/nn_f1",
        "test/hungarian_f1",
        "test/patch_nn_f1",
        "test/descriptor_nn_f1",
        "test/loss",
    ),
)

__all__ = ["TASK", "MatchingData", "MatchingModule"]
