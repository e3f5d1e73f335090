"""Pieces every dance model shares (docs/checkpoints.md#loading-a-model-in-python): input
normalisation, logits at input size, ConvBNReLU, dilated torchvision backbones.

A dance model takes RGB floats in [0, 1] shaped (N, 3, H, W), normalises with the ImageNet
statistics inside (so exports need no preprocessing), and returns logits (N, C, H, W).
Subclass ``SegmentationNet`` and implement ``forward_logits``.
"""
from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from dance.network.pretrained import load_backbone_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """(x - mean) / std per channel; the statistics are constants, not part of the checkpoint."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def resize_bilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of features or logits to ``size`` (H, W); align_corners=False, as
    torchvision's segmentation models do."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def adaptive_avg_pool2d(x: torch.Tensor, bins: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, bins)``, exportable to ONNX at dynamic height and width.

    ONNX has no adaptive pooling; exporters bake the input size into the graph. Under ONNX export
    the same bins as PyTorch's, ``[floor(i n / b), ceil((i + 1) n / b))``, become two averaging
    matrices built from the input's runtime size, applied by matmul.
    """
    if bins == 1 or not torch.onnx.is_in_onnx_export():
        return F.adaptive_avg_pool2d(x, bins)
    rows = _averaging_matrix(x[0, 0, :, 0], bins)
    cols = _averaging_matrix(x[0, 0, 0, :], bins)
    return rows @ x @ cols.transpose(0, 1)


def _averaging_matrix(line: torch.Tensor, bins: int) -> torch.Tensor:
    """(bins, n) matrix whose row i averages bin i of a length-n axis (``line`` gives n)."""
    pos = torch.ones_like(line).cumsum(0) - 1  # 0 .. n-1, traced from the runtime size
    n = pos[-1:] + 1
    i = torch.arange(bins, dtype=line.dtype, device=line.device).unsqueeze(1)
    start, end = torch.floor(i * n / bins), torch.ceil((i + 1) * n / bins)
    inside = ((pos >= start) & (pos < end)).to(line.dtype)
    return inside / inside.sum(1, keepdim=True)


class SegmentationNet(nn.Module, abc.ABC):
    """Base of every dance model: normalise the [0, 1] RGB input, run ``forward_logits`` on it,
    resize the logits to the input's height and width."""

    def __init__(self):
        super().__init__()
        self.normalize = Normalize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_bilinear(self.forward_logits(self.normalize(x)), x.shape[-2:])

    @abc.abstractmethod
    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at any resolution (the model's output stride) from a normalised image."""


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU, 'same' padding for odd kernels at any dilation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1, groups: int = 1):
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                      bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def dilate_(module: nn.Module, dilation: int) -> None:
    """Turn a stride-2 stage into a dilated stride-1 one, in place (the DeepLab / PSPNet trick for
    output stride 16 or 8). The strided 3x3 conv gets ``dilation // 2`` (it still sees the
    pre-stride grid); every later 3x3 conv gets ``dilation``. Parameter shapes do not change,
    so pretrained weights load unchanged. Works for ResNet Basic/Bottleneck blocks (which
    torchvision cannot dilate for ResNet-18) and MobileNet inverted residuals alike."""
    for m in module.modules():
        if not isinstance(m, nn.Conv2d):
            continue
        if m.stride == (2, 2):
            m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                d = max(dilation // 2, 1)
                m.dilation, m.padding = (d, d), (d, d)
        elif m.kernel_size == (3, 3):
            m.dilation, m.padding = (dilation, dilation), (dilation, dilation)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its classifier, returning the four stage outputs
    (strides 4, 8, 16, 32 at ``output_stride=32``; later stages dilated for 16 or 8).

    Attribute names match torchvision's (``conv1``, ``bn1``, ``layer1`` ...), so its state dict
    reads like the classifier's minus ``fc``.
    """

    def __init__(self, arch: str = "resnet50", pretrained_backbone: str | None = None,
                 output_stride: int = 32):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        net = torchvision.models.get_model(arch, weights=None)
        load_backbone_weights(net, pretrained_backbone, arch)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1, net.layer2, net.layer3, net.layer4)
        if output_stride <= 16:
            dilate_(self.layer4, 2 if output_stride == 16 else 4)
        if output_stride == 8:
            dilate_(self.layer3, 2)
        self.channels = [_block_out(layer)
                         for layer in (self.layer1, self.layer2, self.layer3, self.layer4)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


def _block_out(layer: nn.Sequential) -> int:
    """Output channels of a ResNet stage (its last block's last BatchNorm)."""
    return [m for m in layer[-1].modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features
