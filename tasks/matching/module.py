"""LightningModule of the matching task: NLL of the ground-truth assignment, match P/R/F1."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from tasks.app.module import DeclarativeTask, Evaluation, arguments_of
from tasks.matching import baselines
from tasks.matching.metrics import match_metrics
from tasks.matching.model import Batch, MatchingNet, matching_nll, mutual_matches


class MatchingModule(DeclarativeTask):
    """Logs ``<split>/precision``, ``<split>/recall``, ``<split>/f1`` for train, val and test,
    and the losses (see DeclarativeTask). The test split also scores the baselines with the
    same metric: ``test/nn_f1``, ``test/hungarian_f1`` on coordinates and, where the samples
    carry patches, ``test/patch_nn_f1`` (raw patches) and ``test/descriptor_nn_f1`` (the
    model's own descriptors), with their precision and recall."""

    progress_bar = "f1"

    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any],
        baselines: dict[str, Any],
        descriptor_dim: int,
    ) -> None:
        super().__init__(optim, match_metrics())
        options = arguments_of(MatchingNet, model)
        self.net = MatchingNet(descriptor_dim=descriptor_dim, **options)
        self.unmatched_weight = model["unmatched_weight"]
        self.threshold = model["match_threshold"]
        self.baseline_metrics = torch.nn.ModuleDict(
            {
                name: match_metrics(f"test/{name}_")
                for name in baselines_names(baselines, descriptor_dim)
            }
        )
        # name -> max_distance; tuned on the validation set when the config leaves it null.
        self.max_distance: dict[str, float] = {}
        self._threads_before: int | None = None

    def setup(self, stage: str) -> None:
        # Per process (every DDP rank runs it): the model's operations are too small for
        # extra intra-op threads to pay for the barrier each one adds.
        threads = self.hparams.model["threads"]
        if threads is not None and self._threads_before is None:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)

    def teardown(self, stage: str) -> None:
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def forward(self, batch: Batch) -> torch.Tensor:
        """The log-assignment (B, M+1, N+1) of a collated batch (see MatchingNet)."""
        return self.net(batch)

    def evaluate(self, batch: Batch, split: str) -> Evaluation:
        log_assignment = self(batch)
        loss = matching_nll(
            log_assignment,
            batch["matches0"],
            batch["matches1"],
            batch["mask0"],
            batch["mask1"],
            self.unmatched_weight,
        ).mean()
        predicted = mutual_matches(
            log_assignment.detach().exp(), batch["mask0"], batch["mask1"], self.threshold
        )
        return Evaluation(loss, predicted, batch["matches0"], len(batch["mask0"]))

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        for name, metrics in self.baseline_metrics.items():
            matches0, distance = self.baseline(name, batch)
            predicted = baselines.within(matches0, distance, self.max_distance[name])
            metrics.update(predicted, batch["matches0"])
            self.log_metrics(metrics, len(batch["mask0"]))

    @torch.no_grad()
    def baseline(self, name: str, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(matches0, distance)`` (B, M) of the baseline ``name`` on a batch."""
        mask0, mask1 = batch["mask0"], batch["mask1"]
        if name == "hungarian":
            return baselines.hungarian(batch["kpts0"], batch["kpts1"], mask0, mask1)
        if name == "patch_nn":
            features = batch["desc0"], batch["desc1"]
        elif name == "descriptor_nn":
            features = self.net.descriptors(batch)
        else:
            features = batch["kpts0"], batch["kpts1"]
        return baselines.nearest_neighbour(*features, mask0, mask1)

    def on_test_epoch_start(self) -> None:
        fixed = self.hparams.baselines["max_distance"]
        todo = [n for n in self.baseline_metrics if n not in self.max_distance]
        if not todo:
            return
        if fixed is not None:
            self.max_distance.update(dict.fromkeys(todo, float(fixed)))
            return
        # Every rank reads the whole validation set (a plain loader, not sharded), so all
        # ranks find the same thresholds without communicating.
        loader = self.trainer.datamodule.val_dataloader()
        self.max_distance.update(self.tune_max_distance(loader, todo))

    def on_test_epoch_end(self) -> None:
        for name in self.baseline_metrics:
            self.log(f"test/{name}_max_distance", self.max_distance[name], sync_dist=False)

    def tune_max_distance(self, loader: Any, names: list[str]) -> dict[str, float]:
        """Each baseline's F1-maximising distance threshold over the batches of ``loader``."""
        found: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {n: ([], []) for n in names}
        actual = 0
        for batch in loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            actual += int((batch["matches0"] >= 0).sum())
            for name in names:
                matches0, distance = self.baseline(name, batch)
                found[name][0].append(distance.flatten().cpu().numpy())
                correct = (matches0 >= 0) & (matches0 == batch["matches0"])
                found[name][1].append(correct.flatten().cpu().numpy())
        return {
            name: baselines.best_max_distance(np.concatenate(d), np.concatenate(c), actual)
            for name, (d, c) in found.items()
        }


def baselines_names(cfg: dict[str, Any], descriptor_dim: int) -> list[str]:
    """The baselines a run scores: on coordinates always, on raw patches where the data has
    them, on the model's descriptors where the model has some."""
    if not cfg["enabled"]:
        return []
    names = list(baselines.BASELINES)
    if descriptor_dim:
        names += baselines.DESCRIPTOR_BASELINES
    return names


def build_module(cfg: DictConfig, datamodule: pl.LightningDataModule) -> MatchingModule:
    return MatchingModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        baselines=OmegaConf.to_container(cfg.baselines, resolve=True),
        descriptor_dim=datamodule.descriptor_dim,
    )
