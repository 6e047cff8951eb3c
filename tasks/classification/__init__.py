"""Image classification with a choice of final global pooling (avg, max, robust)."""

from tasks.app.registry import TaskSpec
from tasks.classification.config import ClassificationRun, validate
from tasks.classification.data import ClassificationData
from tasks.classification.module import ClassificationModule, build_module

TASK = TaskSpec(
    name="classification",
    schema=ClassificationRun,
    validate=validate,
    build_datamodule=lambda cfg: ClassificationData(cfg.data, cfg.seed),
    build_module=build_module,
    monitor="val/acc",
    monitor_mode="max",
    summary=("val/acc", "test/acc", "test/loss"),
)

__all__ = ["TASK", "ClassificationData", "ClassificationModule"]
