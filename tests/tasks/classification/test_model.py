"""Classifiers: shapes for every backbone and pool, and the backward mode reaching the pool."""

from __future__ import annotations

import pytest
import torch

import ddn_layers as ddn
from tasks.app.layers import declarative_layers, set_backward_mode
from tasks.classification.model import Classifier, GlobalPool

POOLS = ["avg", "max", "robust"]


def test_global_pool_matches_torch():
    x = torch.randn(2, 3, 4, 5)
    assert torch.allclose(GlobalPool("avg")(x), x.mean(dim=(2, 3)))
    assert torch.equal(GlobalPool("max")(x), x.flatten(2).max(-1).values)
    with pytest.raises(ValueError, match="kind"):
        GlobalPool("median")


# Every pool on the small CNN; the ResNet (slower) with the robust pool only.
@pytest.mark.parametrize(
    ("arch", "pool"), [("small_cnn", p) for p in POOLS] + [("resnet18", "robust")]
)
def test_logits_and_gradients(arch, pool):
    net = Classifier(num_classes=7, in_channels=1, arch=arch, width=4, pool=pool)
    x = torch.randn(3, 1, 16, 16)
    logits = net(x)
    assert logits.shape == (3, 7)
    logits.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_robust_pool_gets_penalty_and_alpha():
    net = Classifier(10, 1, width=4, pool="robust", penalty="huber", alpha=0.5)
    ((name, layer),) = declarative_layers(net)
    assert name == "pool" and isinstance(layer, ddn.RobustPool2d)
    x = torch.randn(2, 8, 3, 3)
    assert torch.allclose(layer(x), ddn.RobustPool2d("huber", 0.5)(x))


def test_set_backward_mode_reaches_nested_layers():
    outer = torch.nn.Sequential(
        Classifier(10, 1, width=4), torch.nn.Sequential(Classifier(10, 1, width=4))
    )
    assert set_backward_mode(outer, ddn.BackwardMode.APPROX) == 2
    assert all(layer.backward_mode == "approx" for _, layer in declarative_layers(outer))
    with pytest.raises(ValueError, match="backward_mode"):
        set_backward_mode(outer, "sideways")


def test_pools_agree_on_a_constant_feature_map():
    # Every pool returns the common vector when all positions hold the same one.
    pools = [GlobalPool("avg"), GlobalPool("max"), ddn.RobustPool2d("welsch", 1.0)]
    x = torch.randn(2, 5, 1, 1).expand(2, 5, 3, 3).contiguous()
    for pool in pools:
        assert torch.allclose(pool(x), x[:, :, 0, 0], atol=1e-5)
