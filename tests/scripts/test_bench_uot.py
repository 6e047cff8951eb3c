"""The unbalanced optimal transport benchmark and its plots run end to end (tiny sizes; no
timing checked)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
@pytest.mark.usefixtures("scripts_on_path")
def test_bench_uot_smoke(tmp_path):
    pytest.importorskip("ot")
    import bench_uot

    out = tmp_path / "uot"
    bench_uot.main(["--quick", "--out", str(out)])
    rows = (out / "uot.csv").read_text().splitlines()
    assert rows[0].startswith("m,n,batch,mode,solver,iterations,fwd_ms,bwd_ms,peak_mib")
    assert {line.split(",")[3] for line in rows[1:]} == {
        "implicit", "full", "approx", "unroll", "pot",
    }  # fmt: skip
    targets = (out / "targets.md").read_text()
    for name in ("matmul", "unroll", "POT", "finite differences", "balanced", "zero entries"):
        assert name in targets
    assert (out / "iterations.csv").read_text().startswith("scale,gamma,ours,")
    for png in ("uot_size.png", "uot_iterations.png"):
        assert (out / png).stat().st_size > 0
