"""The pooling benchmark and its plots run end to end (tiny sizes; no timing is checked)."""

from __future__ import annotations

import pytest


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
