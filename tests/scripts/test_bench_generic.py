"""The generic-node benchmark runs end to end (tiny sizes; no timing is checked)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
@pytest.mark.usefixtures("scripts_on_path", "single_thread")
def test_bench_generic_smoke(tmp_path):
    import bench_generic

    bench_generic.main(["--quick", "--budget", "0", "--out", str(tmp_path)])
    text = (tmp_path / "generic.csv").read_text()
    assert text.startswith("case,method,fwd_ms")
    for method in ("structured implicit", "generic implicit", "generic full"):
        assert method in text
    targets = (tmp_path / "targets.md").read_text()
    assert "generic implicit vs generic full gradient" in targets
    assert (tmp_path / "generic.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.usefixtures("scripts_on_path", "single_thread")
def test_bench_generic_targeted_run(tmp_path):
    """--cases and --methods pick what runs; the structured reference always does."""
    import bench_generic

    bench_generic.main(
        ["--quick", "--budget", "0", "--out", str(tmp_path), "--cases", "OT", "--methods", "full"]
    )
    rows = bench_generic.read_csv(tmp_path / "generic.csv")
    assert {r["case"] for r in rows} == {"OT 6x6"}
    assert [r["method"] for r in rows] == ["structured implicit", "structured full", "generic full"]
