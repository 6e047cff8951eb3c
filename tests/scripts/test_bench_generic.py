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
