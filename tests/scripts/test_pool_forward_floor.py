"""scripts/pool_forward_floor.py: the starts-only floor of the pooling forward, against L-BFGS."""

from __future__ import annotations

import torch


def test_the_solver_ends_no_higher_than_its_starts(scripts_on_path):
    """Truncated quadratic with every point beyond alpha is flat at both starts (n alpha^2 / 2,
    what the floor returns); the solver goes on to an input point, (n - 1) alpha^2 / 2. For
    welsch it moves on to a minimum next to a point as well."""
    from bench_pool import make_input, objective64
    from pool_forward_floor import starts_only

    import ddn_layers as ddn

    x = make_input("randn", 3, 64, 5, 1.0, seed=1)
    tq = "truncated-quadratic"
    f0 = objective64(x, starts_only(x, tq, 1.0), tq, 1.0)
    torch.testing.assert_close(f0, torch.full_like(f0, 25 / 2))
    f1 = objective64(x, ddn.robust_pool(x, tq, 1.0), tq, 1.0)
    torch.testing.assert_close(f1, torch.full_like(f1, 24 / 2))
    y0 = starts_only(x, "welsch", 1.0)
    y1 = ddn.robust_pool(x, "welsch", 1.0)
    assert (objective64(x, y1, "welsch", 1.0) <= objective64(x, y0, "welsch", 1.0)).all()


def test_a_run_writes_rows_and_a_table(scripts_on_path, tmp_path):
    import pool_forward_floor as pff

    rows = pff.main(
        ["--rounds", "1", "--kinds", "randn", "--cases", "2,8,3", "--out", str(tmp_path)]
    )
    assert [(r["penalty"], r["C"]) for r in rows] == [(p, 8) for p in pff.PENALTIES]
    for r in rows:
        for name in ("forward", "starts", "median", "torch_median"):
            assert r[f"{name}_ms"] > 0 and r[f"{name}_over_lbfgs"] > 0
    text = (tmp_path / "forward_floor.md").read_text()
    assert "| randn | welsch | 2 8 3 |" in text
    assert (tmp_path / "forward_floor.csv").exists()
    assert (tmp_path / "forward_floor.meta.json").exists()
