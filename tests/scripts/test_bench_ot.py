"""The optimal transport benchmark and its plots run end to end (tiny sizes; no timing checked)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
@pytest.mark.usefixtures("scripts_on_path")
def test_bench_and_plot_smoke(tmp_path):
    pytest.importorskip("ot")
    import bench_ot
    import plot_ot

    out = tmp_path / "ot"
    bench_ot.main(["--quick", "--out", str(out)])
    rows = (out / "ot.csv").read_text().splitlines()
    assert rows[0].startswith("section,device,batch,m,n,mode,solver,iterations")
    modes = {line.split(",")[5] for line in rows[1:]}
    assert modes == {"implicit", "full", "approx", "unroll", "pot"}
    assert any(line.startswith("iters,") for line in rows)
    targets = (out / "targets.md").read_text()
    for name in ("matmul", "unroll", "plain scaling iteration", "float64 full"):
        assert name in targets
    plot_ot.main(["--csv", str(out / "ot.csv")])
    for png in ("ot_size_b1.png", "ot_size_b2.png", "ot_iterations.png"):
        assert (out / png).stat().st_size > 0
