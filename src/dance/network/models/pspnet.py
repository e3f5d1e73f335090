"""PSPNet (Zhao et al. 2017) with gated pyramid-pooling bins (docs/method.md#network-slimming).

A ResNet-18/50 dilated to output stride 8 feeds the pyramid pooling module: bins 1, 2, 3 and 6
(adaptive average pool -> 1x1 conv BN ReLU -> bilinear upsample), concatenated with the features
themselves and fused by a 3x3 conv BN ReLU; dropout and a 1x1 classifier follow, and logits are
resized to the input size.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dance.network.gates import GatedBranches
from dance.network.models.common import (
    ConvBNReLU,
    ResNetBackbone,
    SegmentationNet,
    adaptive_avg_pool2d,
    resize_bilinear,
)
from dance.network.registry import register_model


class PoolingBin(nn.Module):
    """One pyramid level: pool to ``bins x bins``, 1x1 conv BN ReLU, upsample back."""

    def __init__(self, in_channels: int, out_channels: int, bins: int):
        super().__init__()
        self.bins = bins
        self.conv = ConvBNReLU(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_bilinear(self.conv(adaptive_avg_pool2d(x, self.bins)), x.shape[-2:])


class PyramidPooling(GatedBranches):
    """``fuse(concat[x, g_1 bin1(x), g_2 bin2(x), ...])``; only the bins are gated branches.

    The identity path is not removable, so the fusing 3x3 conv over the concatenation is written,
    by linearity, as ``identity(x) + project(concat[gated bins])``: two convs whose sum is the
    paper's one conv. ``project`` is the GatedBranches consumer, so removing a bin slices only its
    input channels; BN and ReLU come after the sum.
    """

    def __init__(self, in_channels: int, bins: Sequence[int] = (1, 2, 3, 6),
                 bin_channels: int | None = None, out_channels: int = 512):
        bin_channels = bin_channels or in_channels // len(bins)
        branches = {f"bin{b}": PoolingBin(in_channels, bin_channels, b) for b in bins}
        project = nn.Conv2d(bin_channels * len(bins), out_channels, 3, padding=1, bias=False)
        super().__init__(branches, {name: bin_channels for name in branches}, project)
        self.identity = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.post = nn.Sequential(nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.identity(x) + super().forward(x))


class PSPNet(SegmentationNet):
    def __init__(self, arch: str, num_classes: int, pretrained_backbone: str | None = None,
                 bins: Sequence[int] = (1, 2, 3, 6), bin_channels: int | None = None,
                 ppm_channels: int = 512, dropout: float = 0.1):
        super().__init__()
        self.backbone = ResNetBackbone(arch, pretrained_backbone, output_stride=8)
        self.ppm = PyramidPooling(self.backbone.channels[3], bins, bin_channels, ppm_channels)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(ppm_channels, num_classes, 1)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.ppm(self.backbone(x)[-1])))


@register_model("pspnet_r18", head=("bin_channels", "ppm_channels"))
def pspnet_r18(num_classes: int, pretrained_backbone: str | None = None,
               bins: Sequence[int] = (1, 2, 3, 6), bin_channels: int | None = None,
               ppm_channels: int = 256, dropout: float = 0.1) -> PSPNet:
    return PSPNet("resnet18", num_classes, pretrained_backbone, bins, bin_channels, ppm_channels,
                  dropout)


@register_model("pspnet_r50", head=("bin_channels", "ppm_channels"))
def pspnet_r50(num_classes: int, pretrained_backbone: str | None = None,
               bins: Sequence[int] = (1, 2, 3, 6), bin_channels: int | None = None,
               ppm_channels: int = 512, dropout: float = 0.1) -> PSPNet:
    return PSPNet("resnet50", num_classes, pretrained_backbone, bins, bin_channels, ppm_channels,
                  dropout)
