"""scripts/approx_check.py: the evidence behind docs/benchmarks/approx_ot.md still comes out."""

from __future__ import annotations

import re


def test_approx_check_prints_its_tables(scripts_on_path, capsys):
    import approx_check

    approx_check.main(["--train-steps", "1", "--modes", "approx"])
    out = capsys.readouterr().out
    assert "| gamma | Sinkhorn iters | cos dM |" in out
    assert "| d | loss | cos dS (approx, implicit) |" in out
    assert "`approx`:" in out and "| 0 | " in out
    # approx's gradient of the matching NLL is the same at every score matrix
    spread = float(re.search(r"differs by at most (\S+) \(", out).group(1))
    assert spread < 1e-12
    # unroll agrees with implicit on the random problems (the yardstick column)
    rows = re.findall(r"^\| [0-9.]+ \| \d+ \|.*$", out, flags=re.M)
    assert len(rows) == 4
    for row in rows:
        assert row.rstrip(" |").endswith("1.000000, 1.000000, 1.000000"), row
