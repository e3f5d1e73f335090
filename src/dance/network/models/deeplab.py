"""DeepLabV3+ (Chen et al. 2018) with a gated ASPP (docs/method.md#network-slimming).

Output stride 16: ResNet-50 with its last stage dilated, or MobileNetV2 with its last two
stride-16/32 stages dilated. ASPP branches at OS 16: ``conv1x1``, ``rate6``, ``rate12``,
``rate18`` (the paper's rates for OS 16; OS 8 would double them) and ``pool`` (image pooling),
concatenated and projected by a 1x1 conv + BN + ReLU (+ dropout). The decoder upsamples the ASPP
output to stride 4, concatenates 48 channels reduced from the low-level features, refines with two
3x3 convs and classifies; logits are resized to the input size.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from torch import nn

from dance.network.gates import GatedBranches
from dance.network.models.common import (
    ConvBNReLU,
    ResNetBackbone,
    SegmentationNet,
    dilate_,
    resize_bilinear,
)
from dance.network.pretrained import load_backbone_weights
from dance.network.registry import register_model


class ImagePooling(nn.Module):
    """ASPP's image-level branch: global average -> 1x1 conv BN ReLU -> broadcast back."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = ConvBNReLU(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_bilinear(self.conv(self.pool(x)), x.shape[-2:])


class ASPP(GatedBranches):
    """Atrous spatial pyramid pooling: every branch gated, removal slices the projection."""

    def __init__(self, in_channels: int, out_channels: int = 256,
                 atrous_rates: Sequence[int] = (6, 12, 18), dropout: float = 0.1):
        branches: dict[str, nn.Module] = {"conv1x1": ConvBNReLU(in_channels, out_channels, 1)}
        for rate in atrous_rates:
            branches[f"rate{rate}"] = ConvBNReLU(in_channels, out_channels, 3, dilation=rate)
        branches["pool"] = ImagePooling(in_channels, out_channels)
        project = nn.Sequential(
            ConvBNReLU(len(branches) * out_channels, out_channels, 1),
            nn.Dropout(dropout),
        )
        super().__init__(branches, {name: out_channels for name in branches}, project,
                         global_branches=["pool"])


class DeepLabV3Plus(SegmentationNet):
    """``backbone(x) -> (low, high)``; ASPP on ``high``; decoder fuses with ``low``."""

    def __init__(self, backbone: nn.Module, low_channels: int, high_channels: int,
                 num_classes: int, aspp_channels: int = 256, decoder_channels: int = 256,
                 atrous_rates: Sequence[int] = (6, 12, 18), dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.aspp = ASPP(high_channels, aspp_channels, atrous_rates, dropout)
        self.reduce = ConvBNReLU(low_channels, 48, kernel_size=1)
        self.decoder = nn.Sequential(
            ConvBNReLU(aspp_channels + 48, decoder_channels, 3),
            ConvBNReLU(decoder_channels, decoder_channels, 3),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.backbone(x)
        context = resize_bilinear(self.aspp(high), low.shape[-2:])
        return self.classifier(self.decoder(torch.cat([context, self.reduce(low)], dim=1)))


class ResNetLowHigh(nn.Module):
    """ResNet at output stride 16 returning (stride-4 features, stride-16 features)."""

    def __init__(self, arch: str, pretrained_backbone: str | None):
        super().__init__()
        self.resnet = ResNetBackbone(arch, pretrained_backbone, output_stride=16)
        self.channels = (self.resnet.channels[0], self.resnet.channels[3])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c2, _, _, c5 = self.resnet(x)
        return c2, c5


class MobileNetV2LowHigh(nn.Module):
    """MobileNetV2 features at output stride 16 returning (stride-4, stride-16 features).

    ``low`` = blocks 0-3 (24 channels x width), ``high`` = blocks 4-17 (320 x width; the final
    1280-channel 1x1 conv is the classifier's and is dropped). Blocks 14-17 (the stride-32 stage
    and after) are dilated by 2.
    """

    def __init__(self, pretrained_backbone: str | None, width_mult: float = 1.0):
        super().__init__()
        net = torchvision.models.mobilenet_v2(weights=None, width_mult=width_mult)
        load_backbone_weights(net, pretrained_backbone, "mobilenet_v2")
        features = net.features
        self.low = features[:4]
        self.high = features[4:-1]
        dilate_(features[14:-1], 2)
        self.channels = (features[3].out_channels, features[17].out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.low(x)
        return low, self.high(low)


@register_model("deeplabv3plus_r50", head=("aspp_channels", "decoder_channels"))
def deeplabv3plus_r50(num_classes: int, pretrained_backbone: str | None = None,
                      aspp_channels: int = 256, decoder_channels: int = 256,
                      atrous_rates: Sequence[int] = (6, 12, 18),
                      dropout: float = 0.1) -> DeepLabV3Plus:
    backbone = ResNetLowHigh("resnet50", pretrained_backbone)
    return DeepLabV3Plus(backbone, *backbone.channels, num_classes, aspp_channels,
                         decoder_channels, atrous_rates, dropout)


@register_model("deeplabv3plus_mbv2", head=("aspp_channels", "decoder_channels"))
def deeplabv3plus_mbv2(num_classes: int, pretrained_backbone: str | None = None,
                       aspp_channels: int = 256, decoder_channels: int = 256,
                       atrous_rates: Sequence[int] = (6, 12, 18), dropout: float = 0.1,
                       width_mult: float = 1.0) -> DeepLabV3Plus:
    backbone = MobileNetV2LowHigh(pretrained_backbone, width_mult)
    return DeepLabV3Plus(backbone, *backbone.channels, num_classes, aspp_channels,
                         decoder_channels, atrous_rates, dropout)
