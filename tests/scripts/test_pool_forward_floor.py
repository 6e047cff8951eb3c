"""scripts/pool_forward_floor.py: the starts-only floor of the pooling forward, against L-BFGS."""

from __future__ import annotations

import torch


def test_starts_only_is_the_solvers_start_where_nothing_moves(scripts_on_path):
    """Truncated quadratic with every point beyond alpha is flat at both starts: the solver
    stays at the better start, which is what the floor returns; for welsch the solver moves
    on and ends no higher than the floor."""
    from bench_pool import make_input, objective64
    from pool_forward_floor import starts_only

    import ddn_layers as ddn

    x = make_input("randn", 3, 64, 5, 1.0, seed=1)
    tq = "truncated-quadratic"
    y, info = ddn.robust_pool(x, tq, 1.0, return_info=True)
    assert torch.equal(starts_only(x, tq, 1.0), y)
    assert (info.iterations == 0).all()
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
