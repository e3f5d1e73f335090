"""BiSeNet V1 (Yu et al. 2018) with a ResNet-18 context path whose context branches are gated
(docs/method.md#network-slimming).

* Spatial path: three stride-2 ConvBNReLUs (7x7, 3x3, 3x3; 64 channels) and a 1x1 to 128: 1/8.
* Context path (ResNet-18 from torchvision): three branches, each a 128-channel map at 1/16,
  gated and summed; the sum is upsampled to 1/8 and refined by a 3x3 ConvBNReLU.
  - ``arm16``: attention refinement module (ARM) on the 1/16 features (layer3);
  - ``arm32``: ARM on the 1/32 features (layer4), upsampled to 1/16, 3x3 ConvBNReLU refine;
  - ``global_context``: global average pool of the 1/32 features, 1x1 conv ReLU, broadcast.
    (Not ``global``: a branch name is a gate's attribute name, and torch.export / ONNX export
    write it into Python code, where a keyword is a syntax error.)
* Feature fusion module (FFM): concat, 1x1 ConvBNReLU to 256, channel attention
  ``x + x * attention(x)``; output head: 3x3 ConvBNReLU, 1x1 classifier, logits resized to the
  input size.

Departures from the reference implementations, and why:

* The reference adds the global context to the 1/32 ARM output and refines that sum before adding
  it to the 1/16 ARM output (a nested sum). Here the three branches meet in ONE flat sum, the
  consumer, so a branch's gate at 0 is exactly the branch removed: removing ``arm16`` deletes its
  ARM, ``arm32`` its ARM and refine conv, ``global_context`` its 1x1 conv; ResNet's layer4 is
  deleted once neither ``arm32`` nor ``global_context`` lives (nothing else reads the 1/32
  features).
* The 1x1 convs on globally pooled features (ARM attention, global context) have a bias instead
  of BatchNorm: BN over a 1x1 map normalises over the batch alone and fails at batch size 1.
* No auxiliary heads: the trainer optimises the main output only, and they never run at
  inference.
"""
from __future__ import annotations

import torch
from torch import nn

from dance.network.gates import MultiScaleModule, new_gates
from dance.network.models.common import ConvBNReLU, ResNetBackbone, SegmentationNet, resize_bilinear
from dance.network.registry import register_model

CONTEXT_BRANCHES = ("arm16", "arm32", "global_context")
# The modules that exist only for a branch: removing the branch deletes them.
_BRANCH_MODULES = {"arm16": ("arm16",), "arm32": ("arm32", "refine32"),
                   "global_context": ("global_context",)}


class AttentionRefinement(nn.Module):
    """ARM: a 3x3 ConvBNReLU to the context width, reweighted per channel by attention from the
    globally pooled map."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels, 3)
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                       nn.Conv2d(out_channels, out_channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x * self.attention(x)


class ContextPath(MultiScaleModule):
    """ResNet-18 and the gated sum ``g_arm16 arm16 + g_arm32 arm32 + g_gc global_context`` at
    1/16, refined at 1/8."""

    def __init__(self, channels: int = 128, pretrained_backbone: str | None = None):
        super().__init__()
        self.backbone = ResNetBackbone("resnet18", pretrained_backbone, output_stride=32)
        c16, c32 = self.backbone.channels[2], self.backbone.channels[3]
        self.arm16 = AttentionRefinement(c16, channels)
        self.arm32 = AttentionRefinement(c32, channels)
        self.refine32 = ConvBNReLU(channels, channels, 3)
        self.global_context = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                            nn.Conv2d(c32, channels, 1), nn.ReLU(inplace=True))
        self.refine16 = ConvBNReLU(channels, channels, 3)
        self.gates = new_gates(CONTEXT_BRANCHES)

    @staticmethod
    def _needs_layer4(live) -> bool:
        return "arm32" in live or "global_context" in live

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        f8 = b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x))))))
        f16 = b.layer3(f8)
        f32 = b.layer4(f16) if self._needs_layer4(self.gates) else None
        size = f16.shape[-2:]
        terms = []
        if "arm16" in self.gates:
            terms.append(self.gates["arm16"] * self.arm16(f16))
        if "arm32" in self.gates:
            terms.append(self.gates["arm32"]
                         * self.refine32(resize_bilinear(self.arm32(f32), size)))
        if "global_context" in self.gates:
            glob = self.gates["global_context"] * self.global_context(f32)
            terms.append(glob.expand(-1, -1, size[0], size[1]))
        return self.refine16(resize_bilinear(sum(terms), f8.shape[-2:]))

    def _remove(self, names: list[str]) -> None:
        for name in names:
            for attr in _BRANCH_MODULES[name]:
                delattr(self, attr)
        if not self._needs_layer4(set(self.gates) - set(names)):
            del self.backbone.layer4


class SpatialPath(nn.Sequential):
    """Three stride-2 convs to 1/8 with wide receptive field kept cheap, then a 1x1."""

    def __init__(self, out_channels: int = 128, mid_channels: int = 64):
        super().__init__(ConvBNReLU(3, mid_channels, 7, stride=2),
                         ConvBNReLU(mid_channels, mid_channels, 3, stride=2),
                         ConvBNReLU(mid_channels, mid_channels, 3, stride=2),
                         ConvBNReLU(mid_channels, out_channels, 1))


class FeatureFusion(nn.Module):
    """FFM: concat the two paths, 1x1 ConvBNReLU, then ``x + x * channel_attention(x)``."""

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 4):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels, 1)
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(out_channels, out_channels // reduction, 1),
            nn.ReLU(inplace=True), nn.Conv2d(out_channels // reduction, out_channels, 1),
            nn.Sigmoid())

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.conv(torch.cat([spatial, context], dim=1))
        return x + x * self.attention(x)


class BiSeNetV1(SegmentationNet):
    def __init__(self, num_classes: int, pretrained_backbone: str | None = None,
                 spatial_channels: int = 128, context_channels: int = 128,
                 fusion_channels: int = 256):
        super().__init__()
        self.spatial_path = SpatialPath(spatial_channels)
        self.context_path = ContextPath(context_channels, pretrained_backbone)
        self.ffm = FeatureFusion(spatial_channels + context_channels, fusion_channels)
        self.head = nn.Sequential(ConvBNReLU(fusion_channels, fusion_channels, 3),
                                  nn.Conv2d(fusion_channels, num_classes, 1))

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        # Both paths reach 1/8 through the same ceil-halving strides, so their sizes agree.
        return self.head(self.ffm(self.spatial_path(x), self.context_path(x)))


@register_model("bisenet_v1_r18", head=("spatial_channels", "context_channels",
                                                 "fusion_channels"))
def bisenet_v1_r18(num_classes: int, pretrained_backbone: str | None = None,
                   spatial_channels: int = 128, context_channels: int = 128,
                   fusion_channels: int = 256) -> BiSeNetV1:
    """BiSeNet V1, ResNet-18 context path (``pretrained_backbone``: torchvision ResNet-18 weights
    name or a local file); narrower paths for quick tests."""
    return BiSeNetV1(num_classes, pretrained_backbone, spatial_channels, context_channels,
                     fusion_channels)
