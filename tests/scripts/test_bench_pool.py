"""The pooling benchmark and its plots run end to end (tiny sizes; no timing is checked)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture
def scripts_on_path(monkeypatch):
    # the scripts import their helpers as run from scripts/ (``from benchutil import ...``)
    monkeypatch.syspath_prepend(str(SCRIPTS))
    yield
    for name in ("bench_pool", "plot_pool", "benchutil"):
        sys.modules.pop(name, None)


@pytest.mark.slow
@pytest.mark.usefixtures("scripts_on_path", "single_thread")
def test_bench_and_plot_smoke(tmp_path):
    import bench_pool
    import plot_pool

    out = tmp_path / "pool"
    bench_pool.main(
        ["--quick", "--sizes", "4", "--kinds", "randn", "feature", "--penalties", "huber",
         "welsch", "--modes", "implicit", "full", "--out", str(out)]
    )  # fmt: skip
    text = (out / "pool.csv").read_text()
    assert text.startswith("kind,penalty,B,C,s,n,mode") and "lbfgs" in text
    targets = (out / "targets.md").read_text()
    assert "| non-finite y or gradient | all rows | 0 | 0 | yes |" in targets
    plot_pool.main(["--csv", str(out / "pool.csv")])
    assert (out / "fig1_randn.png").stat().st_size > 0 and (out / "modes_feature.png").exists()
