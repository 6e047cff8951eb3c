"""Matching model: a padded batch is the samples one by one (loss and gradients, every
backward mode), the dustbin marginals, the radial frame's invariance, the loss and the
prediction rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import ddn_layers as ddn
from tasks.app.layers import declarative_layers, set_backward_mode
from tasks.matching.config import DataConfig
from tasks.matching.data import SyntheticPairs, collate_pairs
from tasks.matching.model import MatchingNet, matching_nll, mutual_matches, standardize

MODES = ["implicit", "full", "approx", "unroll"]


def tiny_net(mode="implicit", **kwargs) -> MatchingNet:
    torch.manual_seed(0)
    options = dict(dim=8, layers=1, heads=2, knn=3, ot_tol=1e-9, ot_max_iter=2000)
    options.update(kwargs)
    net = MatchingNet(**options).double()
    net.ot.backward_mode = mode
    return net


def samples(n: int = 3, seed: int = 0, patch: int = 0):
    """Synthetic pairs; with ``patch``, each point also gets a random patch x patch patch."""
    cfg = OmegaConf.structured(DataConfig)
    cfg.synthetic.min_inliers, cfg.synthetic.max_inliers = 4, 9
    source = SyntheticPairs(cfg.synthetic, cfg.warp)
    rng = np.random.default_rng(seed)
    out = [source.sample(rng) for _ in range(n)]
    for s in out if patch else ():
        for side in "01":
            s[f"desc{side}"] = torch.randn(len(s[f"kpts{side}"]), patch * patch)
    return out


def run(net, batch, weight=0.7):
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    log_assignment = net(batch)
    keys = ("matches0", "matches1", "mask0", "mask1")
    return log_assignment, matching_nll(log_assignment, *(batch[k] for k in keys), weight)


@pytest.mark.parametrize(
    ("mode", "options"),
    [(mode, {}) for mode in MODES]
    + [("implicit", {"transport": "unbalanced", "descriptor": "cnn", "descriptor_dim": 25})],
)
def test_padded_batch_equals_samples_one_by_one(mode, options, single_thread):
    net = tiny_net(mode, **options)
    items = samples(patch=5 if options else 0)
    sizes = [(len(s["kpts0"]), len(s["kpts1"])) for s in items]
    assert len(set(sizes)) > 1, "the samples need padding"

    _, losses = run(net, collate_pairs(items))
    losses.mean().backward()
    batched = {n: p.grad.clone() for n, p in net.named_parameters()}

    net.zero_grad()
    alone = []
    for s in items:
        _, loss = run(net, collate_pairs([s]))
        (loss.sum() / len(items)).backward()
        alone.append(loss.detach())
    torch.testing.assert_close(losses.detach(), torch.cat(alone), rtol=1e-7, atol=1e-9)
    for name, p in net.named_parameters():
        torch.testing.assert_close(batched[name], p.grad, rtol=1e-6, atol=1e-9, msg=name)


def assignment_on_padded_samples(net):
    """The assignment probabilities of ``net`` on a padded batch, its masks and real sizes,
    once checked that padding holds no probability."""
    batch = collate_pairs(samples())
    with torch.no_grad():
        A = run(net, batch)[0].exp()
    m0, m1 = batch["mask0"], batch["mask1"]
    M, N = m0.shape[1], m1.shape[1]
    assert (A[:, :M][~m0] == 0).all() and (A[:, :, :N].transpose(1, 2)[~m1] == 0).all()
    return A, m0, m1, M, N


def test_padding_takes_no_mass_and_dustbins_take_the_rest():
    A, m0, m1, M, N = assignment_on_padded_samples(tiny_net())
    # every real point spreads probability one over the other set and its dustbin
    row_sums, col_sums = A[:, :M].sum(2)[m0], A[:, :, :N].sum(1)[m1]
    torch.testing.assert_close(row_sums, torch.ones_like(row_sums), atol=1e-7, rtol=0)
    torch.testing.assert_close(col_sums, torch.ones_like(col_sums), atol=1e-7, rtol=0)
    # dustbin row mass n and column mass m
    torch.testing.assert_close(A[:, M].sum(1), m1.sum(1).double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(A[:, :, N].sum(1), m0.sum(1).double(), atol=1e-6, rtol=0)


def test_radial_frame_local_shape_is_invariant_to_affine_maps():
    # After whitening an affine map is a rotation about the centroid, which the radial frame
    # does not see: a point's local-shape embedding is unchanged.
    net = tiny_net(radial_frame=True, normalize="whiten")
    (sample,) = samples(1)
    points = sample["kpts1"].double().unsqueeze(0)
    mask = torch.ones(points.shape[:2], dtype=torch.bool)
    theta = 0.9
    A = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    A = A.double() @ torch.tensor([[1.6, 0.4], [0.0, 0.7]]).double()
    moved = points @ A.T + torch.tensor([0.3, -2.0]).double()
    with torch.no_grad():
        before = net.local(standardize(points, mask, "whiten"), mask)
        after = net.local(standardize(moved, mask, "whiten"), mask)
    torch.testing.assert_close(before, after, atol=1e-9, rtol=1e-9)


def test_loss_is_small_for_the_true_assignment_and_weights_the_dustbin():
    # set 0: 3 points, point 2 unmatched; set 1: 2 points, point 0 matches 1 and 1 matches 0
    matches0 = torch.tensor([[1, 0, -1]])
    matches1 = torch.tensor([[1, 0]])
    mask0, mask1 = torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)
    A = torch.zeros(1, 4, 3)
    A[0, 0, 1] = A[0, 1, 0] = A[0, 2, 2] = 1.0
    zero = matching_nll(A.log(), matches0, matches1, mask0, mask1)
    assert float(zero) == pytest.approx(0.0, abs=1e-6)
    A[0, 2, 2] = 0.5
    loss = matching_nll(A.log(), matches0, matches1, mask0, mask1, unmatched_weight=2.0)
    assert float(loss) == pytest.approx(2.0 * math.log(2.0))
    # -inf (zero probability) where no term looks leaves the loss and its gradient finite
    log_a = A.log().requires_grad_()
    matching_nll(log_a, matches0, matches1, mask0, mask1).backward()
    assert torch.isfinite(log_a.grad).all() and float(log_a.grad[0, 0, 1]) == -0.5


def test_mutual_matches_need_both_directions_and_the_threshold():
    A = torch.zeros(1, 4, 4)
    A[0, :3, :3] = torch.tensor([[0.9, 0.05, 0.0], [0.6, 0.3, 0.0], [0.0, 0.0, 0.15]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    # row 1's best column is 0, whose best row is 0: not mutual; row 2 is below 0.2
    assert mutual_matches(A, mask, mask, 0.2).tolist() == [[0, -1, -1]]
    assert mutual_matches(A, mask, mask, 0.1).tolist() == [[0, -1, 2]]
    # padding is never predicted, however large its entries
    A[0, 2, 2] = 5.0
    pad = torch.tensor([[True, True, False]])
    assert mutual_matches(A, pad, mask, 0.1)[0, 2] == -1


def test_unbalanced_transport_reads_the_mass_a_point_sends_as_its_odds():
    net = tiny_net(transport="unbalanced", rho=0.5)
    assert net.ot.marginal_penalty == (0.5, 0.5)
    A, m0, m1, M, N = assignment_on_padded_samples(net)
    assert (A[:, M, N] == 0).all()
    # odds q = (1 - no match) / no match; entries over sqrt((1 + q_i)(1 + q_j)) are the plan,
    # whose row sums are the rows' q
    q0, q1 = 1 / A[:, :M, N] - 1, 1 / A[:, M, :N] - 1
    real = m0.unsqueeze(2) & m1.unsqueeze(1)
    plan = A[:, :M, :N] * ((1 + q0).unsqueeze(2) * (1 + q1).unsqueeze(1)).sqrt()
    plan = torch.where(real, plan, 0.0)
    torch.testing.assert_close(plan.sum(2)[m0], q0[m0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(plan.sum(1)[m1], q1[m1], rtol=1e-9, atol=1e-12)


def test_the_ot_layer_is_the_one_declarative_layer():
    net = MatchingNet(dim=8, heads=2)
    assert declarative_layers(net) == [("ot", net.ot)]
    assert set_backward_mode(net, ddn.BackwardMode.UNROLL) == 1
    assert net.ot.backward_mode is ddn.BackwardMode.UNROLL
    with pytest.raises(ValueError, match="normalize"):
        MatchingNet(normalize="sphere")
    with pytest.raises(ValueError, match="transport"):
        MatchingNet(transport="dustpan")
    with pytest.raises(ValueError, match="square patches"):
        MatchingNet(descriptor="cnn", descriptor_dim=24)
