"""Every committed benchmark CSV redraws its figures (what `make plots` does), here into a
temporary folder so that the committed PNGs are left alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"


@pytest.mark.slow
@pytest.mark.usefixtures("scripts_on_path")
def test_committed_csvs_redraw_every_figure(tmp_path):
    import bench_generic
    import plot_ot
    import plot_pool
    import plot_sweep

    plot_ot.main(["--csv", str(BENCH / "ot" / "ot.csv"), "--out", str(tmp_path / "ot")])
    assert list((tmp_path / "ot").glob("*.png"))

    shutil.copytree(BENCH / "pool", tmp_path / "pool")
    for png in (tmp_path / "pool").glob("*.png"):
        png.unlink()
    plot_pool.main(["--csv", str(tmp_path / "pool" / "pool.csv")])
    assert {p.name for p in (BENCH / "pool").glob("*.png")} <= {
        p.name for p in (tmp_path / "pool").glob("*.png")
    }

    shutil.copytree(BENCH / "generic", tmp_path / "generic")
    (tmp_path / "generic" / "generic.png").unlink()
    bench_generic.main(["--replot", "--out", str(tmp_path / "generic")])
    assert (tmp_path / "generic" / "generic.png").stat().st_size > 0

    sweeps = sorted((BENCH / "sweeps").glob("*/sweep.csv"))
    for csv in sweeps:
        copy = tmp_path / "sweeps" / csv.parent.name
        shutil.copytree(csv.parent, copy)
        (copy / "sweep.png").unlink()
        plot_sweep.main(["--csv", str(copy / "sweep.csv")])
        assert (copy / "sweep.png").stat().st_size > 0
        # the committed README is what the script writes from the committed CSV
        assert (copy / "README.md").read_text() == (csv.parent / "README.md").read_text()
