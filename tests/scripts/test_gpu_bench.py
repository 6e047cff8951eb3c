"""scripts/gpu_bench.sh's dry run (--device cpu, tiny sizes): every step of the GPU session
runs and writes its files into the one folder, and the summary says so."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = (
    "cuda_tests",
    "ot_batch16",
    "ot_plot",
    "ot_batch1_pot",
    "pool_batch",
    "pool_plot",
    "sweep_classification",
    "sweep_matching",
)


@pytest.mark.slow
def test_gpu_bench_cpu_dry_run(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(
        ["bash", "scripts/gpu_bench.sh", "--device", "cpu", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr + summary
    for step in STEPS:
        assert f"| {step} | ok |" in summary, summary
        assert (out / "logs" / f"{step}.log").is_file()
    for path in (
        "ot/ot.csv",
        "ot_b1/ot.csv",
        "pool/pool.csv",
        "sweep_classification/sweep.csv",
        "sweep_matching/sweep.csv",
    ):
        assert (out / path).stat().st_size > 0, path
    assert list((out / "ot").glob("*.png")) and list((out / "pool").glob("*.png"))
    assert "## Sweep: classification" in summary and "| robust/implicit |" in summary
    assert "## Sweep: matching" in summary


def test_gpu_bench_rejects_unknown_arguments(tmp_path):
    proc = subprocess.run(
        ["bash", "scripts/gpu_bench.sh", "--device", "tpu"], cwd=ROOT, capture_output=True
    )
    assert proc.returncode == 2 and b"--device must be cuda or cpu" in proc.stderr
    proc = subprocess.run(
        ["bash", "scripts/gpu_bench.sh", "--bogus"], cwd=ROOT, capture_output=True
    )
    assert proc.returncode == 2
