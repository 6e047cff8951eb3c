"""scripts/check_pool_prediction.py: the evidence for the solver's predicted-stop threshold."""

from __future__ import annotations


def test_predictions_pair_with_the_residual_measured_next(scripts_on_path, capsys):
    import check_pool_prediction as cpp

    out = cpp.main(["--problems", "40", "--seed", "3"])
    text = capsys.readouterr().out
    assert "predictions" in text and "<- the solver's" in text
    # every threshold counts at least the predictions of the one below it
    counts = [out[t][0] for t in cpp.THRESHOLDS]
    assert counts == sorted(counts) and counts[-1] > 0
    # at the solver's own threshold, what was predicted was then measured within tol
    assert out[cpp.PREDICTED_STOP][1] <= 1.0


def test_a_prediction_is_close_to_the_next_residual_on_a_linear_contraction(scripts_on_path):
    """One channel, points 0, 1, 5, pseudo-huber at alpha 0.3: IRLS contracts linearly for two
    steps (then Newton finishes, where no prediction is made); each prediction is within a
    factor 2 of the residual measured next."""
    import torch
    from check_pool_prediction import pairs_of

    from ddn_layers.pooling.penalties import PENALTIES

    x = torch.tensor([[[0.0, 1.0, 5.0]]], dtype=torch.float64)
    alpha = torch.tensor(0.3, dtype=torch.float64)
    p, a = pairs_of(x, alpha, PENALTIES["pseudo-huber"], 0, 1e-12)
    assert p.numel() == 2 and not p.isnan().any()
    assert ((a / p > 0.5) & (a / p < 2)).all(), a / p
