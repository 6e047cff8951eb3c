"""The README's results tables are exactly what scripts/readme_tables.py writes from the
committed CSVs, so the two can never disagree; and a changed CSV changes the README."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.usefixtures("scripts_on_path")
def test_readme_tables_match_the_committed_csvs():
    import readme_tables

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme_tables.rewrite(text, readme_tables.render(ROOT)) == text, (
        "README.md's results tables disagree with docs/benchmarks/*.csv: run "
        "python scripts/readme_tables.py"
    )
    assert readme_tables.main(["--check"]) == 0


@pytest.mark.usefixtures("scripts_on_path")
def test_a_new_csv_rewrites_only_the_block(tmp_path):
    import readme_tables

    bench = tmp_path / "docs" / "benchmarks"
    shutil.copytree(ROOT / "docs" / "benchmarks" / "pool", bench / "pool")
    (bench / "ot").mkdir(parents=True)
    (bench / "ot" / "ot.csv").write_text(
        "section,device,batch,m,n,mode,solver,iterations,fwd_ms,bwd_ms,peak_mib\n"
        "size,cpu,1,500,500,implicit,auto,1100,100.0,12.5,4.8\n"
        "size,cpu,1,500,500,pot,log,,900.0,1500.0,2300.0\n"
        "size,cpu,1,250,250,implicit,auto,180,22.0,1.8,1.2\n"
    )
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{readme_tables.BEGIN}\nstale\n{readme_tables.END}\noutro\n")
    assert readme_tables.main(["--readme", str(readme), "--root", str(tmp_path), "--check"]) == 1
    assert readme_tables.main(["--readme", str(readme), "--root", str(tmp_path)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "stale" not in text
    assert "500 x 500, batch 1" in text  # the paper's size when measured
    assert "| `implicit` (auto) | 100 ms | 12.5 ms | 4.80 MiB | 1100 |" in text
    assert "| POT `ot.sinkhorn` + autograd | 900 ms | 1.50 s | 2.25 GiB | - |" in text
    assert "| `unroll` | not measured at this size |" in text
    assert "Sweep `matching`: not run yet" in text
    assert readme_tables.main(["--readme", str(readme), "--root", str(tmp_path), "--check"]) == 0
