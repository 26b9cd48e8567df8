"""The demo model's architecture: a small CNN for 1-channel phantom radiographs.

It is loaded through the same ``"pkg.module:factory"`` path as any custom model
(``arch = "service.demo.model:phantom_net"`` in the demo's models file).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn


def _conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _stage(in_channels: int, out_channels: int) -> nn.Sequential:
    # Downsample by 2×2 max pooling, not a strided 3×3 conv: a pooled cell covers
    # exactly its 2×2 tile, so every cell of the final map is centred on the input
    # tile it stands for, which is what heatmap upsampling assumes. (A stride-2,
    # padding-1 conv centres cell j on pixel 2j, not 2j + 0.5: after three of
    # them the map sits 3.5 input pixels off, enough to miss a small nodule.)
    return nn.Sequential(
        nn.MaxPool2d(2), _conv(in_channels, out_channels), _conv(out_channels, out_channels)
    )


class PhantomNet(nn.Module):
    """``(N, channels, H, W) float32`` → ``(N, num_classes)`` logits.

    Four stages at strides 1, 2, 4, 8 (see ``_stage``); ``features`` ends at stride 8 (16×16 for a
    128×128 input), which is the Grad-CAM layer: fine enough to point at a
    nodule, deep enough to know what a nodule is.

    The head scores every position with a 1×1 convolution and pools the score
    maps with log-sum-exp (sharpness ``r``), between average (r → 0) and max
    (r → ∞) pooling. With average pooling a network may spread a finding's
    evidence over the whole lung; near-max pooling makes it score the finding
    where it is, so its Grad-CAM points at the finding. (For this head the
    Grad-CAM map at ``features`` is exactly the class score map.)
    """

    def __init__(
        self, num_classes: int = 4, channels: int = 1, width: int = 32, sharpness: float = 4.0
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                stem=_conv(channels, width // 2),
                stage1=_stage(width // 2, width),
                stage2=_stage(width, 2 * width),
                stage3=_stage(2 * width, 4 * width),
            )
        )
        self.classifier = nn.Conv2d(4 * width, num_classes, 1)
        self.sharpness = sharpness

    def forward(self, x: Tensor) -> Tensor:
        scores = self.classifier(self.features(x)).flatten(2)  # (N, K, H*W)
        r = self.sharpness
        return (torch.logsumexp(r * scores, dim=2) - math.log(scores.shape[2])) / r


def phantom_net(num_classes: int = 4) -> PhantomNet:
    """Factory named in the demo models file."""
    return PhantomNet(num_classes=num_classes)
