"""Image classifiers whose final global pooling is a choice: average, max, or robust.

A backbone maps (B, C_in, H, W) images to a (B, C, h, w) feature map; the pool turns the
h * w feature vectors into one (B, C) vector, and a linear head gives the logits. With
``pool="robust"`` the pool is ``ddn.RobustPool2d``: a declarative layer that can ignore
feature vectors computed from corrupted regions, where the mean is dragged by them.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn

import ddn_layers as ddn


class GlobalPool(nn.Module):
    """Average or max over all spatial positions: (B, C, H, W) -> (B, C)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in ("avg", "max"):
            raise ValueError(f"kind must be one of ['avg', 'max'], got {kind!r}")
        self.kind = kind

    def extra_repr(self) -> str:
        return self.kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) if self.kind == "avg" else x.amax(dim=(2, 3))


def build_pool(
    kind: str, penalty: str = "welsch", alpha: float = 1.0, **pool_kwargs: Any
) -> nn.Module:
    """The final pooling layer: (B, C, H, W) -> (B, C). A robust pool has the default backward
    mode until the run's ``ddn.backward_mode`` is set on the whole model."""
    if kind == "robust":
        return ddn.RobustPool2d(penalty=penalty, alpha=alpha, **pool_kwargs)
    return GlobalPool(kind)


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Four 3x3 conv layers and one 2x downsampling: quick on CPU, and each pooled feature
    vector sees only a 14x14 window of the input, so on larger images a corrupted patch spoils
    some feature vectors and leaves the others clean."""

    def __init__(self, in_channels: int, width: int = 32) -> None:
        super().__init__()
        self.out_channels = 2 * width
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, width),
            _conv_bn_relu(width, width),
            nn.MaxPool2d(2),
            _conv_bn_relu(width, 2 * width),
            _conv_bn_relu(2 * width, 2 * width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _resnet_backbone(arch: str, in_channels: int) -> tuple[nn.Module, int]:
    net = getattr(torchvision.models, arch)(weights=None)
    # The ImageNet stem (7x7 stride 2, then max pooling) would shrink a 32x32 image to 8x8
    # before the first block; a 3x3 stride-1 stem keeps the resolution small images need.
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    channels = net.fc.in_features
    body = nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )
    return body, channels


class Classifier(nn.Module):
    """backbone -> pool -> dropout -> linear."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        arch: str = "small_cnn",
        width: int = 32,
        pool: str = "robust",
        penalty: str = "welsch",
        alpha: float = 1.0,
        pool_kwargs: dict[str, Any] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if arch == "small_cnn":
            self.backbone: nn.Module = SmallCNN(in_channels, width)
            channels = self.backbone.out_channels
        elif arch.startswith("resnet"):
            self.backbone, channels = _resnet_backbone(arch, in_channels)
        else:
            raise ValueError(f"arch must be small_cnn or a torchvision resnet, got {arch!r}")
        self.pool = build_pool(pool, penalty, alpha, **(pool_kwargs or {}))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled (B, C) features."""
        x = self.backbone(x)
        # Distances between C-dimensional vectors grow like sqrt(C), so dividing by it makes
        # alpha mean the same at every width (average and max pooling commute with it).
        scale = x.shape[1] ** 0.5
        return self.pool(x / scale) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))
