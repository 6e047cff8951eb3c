"""Kill a run of train.py with SIGKILL after a checkpoint, resume it, and read what the runs
left: weights, test metrics, logged losses, and where each resume started."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import torch

from tests.processes import Run, TrainProcesses


def kill_after_checkpoints(run: Run, last: Path, count: int, fraction: float) -> bool:
    """SIGKILL ``run`` a ``fraction`` of a checkpoint interval after it has written its
    ``count``-th checkpoint (``count`` >= 2: the interval is the time between the last two);
    False when it ended first. The delay scales with the machine's speed, so a fast machine
    does not finish the run before it is killed."""
    seen, stamp = 0, last.stat().st_mtime_ns if last.exists() else 0
    seen_at = [time.monotonic()]
    deadline = seen_at[0] + 240
    while run.status() is None and seen < count:
        assert time.monotonic() < deadline, f"no checkpoint was written: {run.tail()}"
        now = last.stat().st_mtime_ns if last.exists() else 0
        if now != stamp:
            seen, stamp = seen + 1, now
            seen_at.append(time.monotonic())
        time.sleep(0.002)
    if run.status() is None:
        time.sleep(fraction * (seen_at[-1] - seen_at[-2]))
    status = run.kill()
    assert status in (0, -9), f"train.py failed with {status}: {run.tail()}"
    return status == -9


def position(checkpoint: Path) -> dict[str, int]:
    """Where a run resumed from ``checkpoint`` starts: global step, epoch, batch in the epoch."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    data = ckpt["callbacks"]["DataPosition"]
    epoch, batch = divmod(data["batches"], data["per_epoch"])
    return {"step": ckpt["global_step"], "epoch": epoch, "batch": batch}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / "last.ckpt"
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def final_metrics(run_dir: Path) -> dict[str, Any]:
    results = json.loads((run_dir / "results.json").read_text())
    return {k: v for k, v in results.items() if k.startswith(("test/", "best/"))}


def logged_losses(run_dir: Path) -> dict[int, str]:
    """``train/loss`` per step, as written (for exact compares), from every CSV log of a run:
    one per part of a resumed run. A killed part's last row may be cut short: it is left out."""
    versions = sorted((run_dir / "csv").glob("version_*"), key=lambda p: int(p.name[8:]))
    losses: dict[int, str] = {}
    for i, version in enumerate(versions):
        with open(version / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
        if i < len(versions) - 1:
            rows = rows[:-1]
        losses.update({int(r["step"]): r["train/loss"] for r in rows})
    return losses


class KilledRun:
    """The run ``killed`` under ``runs_dir``: started, SIGKILLed, resumed with ``ckpt=last``."""

    def __init__(self, processes: TrainProcesses, runs_dir: Path, logs: Path) -> None:
        self.processes = processes
        self.runs_dir = runs_dir
        self.logs = logs
        self.launches = 0
        self.starts: list[dict[str, int]] = []  # where each resume started
        self.finished = False

    @property
    def dir(self) -> Path:
        return self.runs_dir / "killed"

    def _launch(self, args: list[str]) -> Run:
        self.launches += 1
        resume = ["ckpt=last", "name=killed", f"runs_dir={self.runs_dir}"]
        first = self.launches == 1
        return self.processes.start(
            [*args, "name=killed"] if first else resume, self.logs / f"{self.launches}.log"
        )

    def kill(self, args: list[str], moments: list[tuple[int, float]]) -> None:
        """Start the run (``args``, the first time) or resume it, and SIGKILL it at the first
        of ``moments``: ``(n, f)``, a fraction ``f`` of a checkpoint interval after its
        ``n``-th checkpoint; and so on for each moment, unless it ends first."""
        last = self.dir / "checkpoints" / "last.ckpt"
        for count, fraction in moments:
            if self.finished:
                return
            if kill_after_checkpoints(self._launch(args), last, count, fraction):
                self.starts.append(position(last))
            else:
                self.finished = True

    def finish(self) -> None:
        if not self.finished:
            run = self._launch([])
            assert run.wait(300) == 0, run.tail()
            self.finished = True
