"""``train.py`` runs as real processes, started through ``tests/train_server.py`` (a fork of a
process that has imported torch and Lightning already), so that tests can start, SIGKILL and
resume many runs without paying for those imports each time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    """One ``train.py`` process; ``log`` gets its stdout and stderr."""

    pid: int
    log: Path

    def status(self) -> int | None:
        """Exit status once it has ended (negative: the signal that ended it), else None."""
        path = Path(f"{self.log}.status")
        text = path.read_text() if path.is_file() else ""
        return int(text) if text else None

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (status := self.status()) is None:
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"train.py did not finish in {timeout} s: {self.tail()}")
            time.sleep(0.02)
        return status

    def kill(self) -> int:
        """SIGKILL the run's whole process group (its DDP ranks too), as a preemption would."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:  # it had ended
            pass
        return self.wait(60)

    def tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.is_file() else ""


class TrainProcesses:
    """Starts ``train.py [args]`` runs; :meth:`close` when done."""

    def __init__(self) -> None:
        self.server = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "train_server.py")],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.runs: list[Run] = []

    def start(self, args: list[str], log: Path) -> Run:
        Path(f"{log}.status").unlink(missing_ok=True)
        self.server.stdin.write(json.dumps({"args": args, "log": str(log)}) + "\n")
        self.server.stdin.flush()
        line = self.server.stdout.readline()
        if not line:
            raise RuntimeError("tests/train_server.py stopped")
        self.runs.append(Run(int(line), log))
        return self.runs[-1]

    def run(self, args: list[str], log: Path, timeout: float = 300) -> None:
        """A run to its end; AssertionError with the end of its log unless it exits with 0."""
        run = self.start(args, log)
        status = run.wait(timeout)
        assert status == 0, f"train.py exited with {status}: {run.tail()}"

    def close(self) -> None:
        for run in self.runs:  # a test that failed half-way may have left one going
            if run.status() is None:
                run.kill()
        self.server.stdin.close()
        try:
            self.server.wait(30)
        except subprocess.TimeoutExpired:
            self.server.kill()
