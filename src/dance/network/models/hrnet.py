"""HRNet-W18-small with the HRNetV2 segmentation head; its resolution streams are the gated
branches (docs/method.md#network-slimming).

Architecture (defaults = HRNet-W18-small-v2, the official HRNet-Semantic-Segmentation
``seg_hrnet_w18_small_v2`` / mmseg ``hr18s`` config):

* stem: two 3x3 stride-2 ConvBNReLUs (64 channels) to 1/4, then stage 1 = 2 Bottlenecks (-> 256);
* stage 2: 1 module,  streams 1/4, 1/8             (widths 18, 36);
* stage 3: 3 modules, streams 1/4, 1/8, 1/16       (18, 36, 72);
* stage 4: 2 modules, streams 1/4, 1/8, 1/16, 1/32 (18, 36, 72, 144);
  every module runs 2 BasicBlocks on each stream, then fuses: each stream receives the sum of
  all streams resampled to its resolution (1x1 conv BN + bilinear up, or 3x3 stride-2 conv BN
  chains down), then ReLU;
* HRNetV2 head: upsample every stream to 1/4, concat (270 channels), 1x1 ConvBNReLU, 1x1
  classifier; logits are resized to the input size.

At 19 classes: 4.04M parameters, 38.7 GFLOPs at 512x1024 (multiply-add = 2; the official
model, whose transitions are lighter, has 3.9M). ``widths``, ``stem_channels``, ``stage1_blocks``,
``blocks_per_branch`` and ``modules_per_stage`` shrink it for quick tests.

Gated branches: ``stream2`` (1/8), ``stream3`` (1/16), ``stream4`` (1/32); the 1/4 stream is the
trunk and is not removable. A stream's gate multiplies its contribution wherever another part of
the network consumes it: the fusion terms it sends into the other streams, the new streams made
from it, and its slice of the head's concat. So with ``g = 0`` nothing of the stream reaches the
output, and removing it (its transition, its blocks, every fuse path from and to it, its input
channels of the head's projection) gives the same output.

One departure from the official code, so that each stream can be removed on its own: a new
stream is made from ALL existing streams (each downsampled to it, summed, ReLU) -- the exchange
unit across stages as the HRNet paper defines it (Sun et al. 2019, the extra output
``a(Y_s, s+1)`` sums every input) -- instead of from the last stream only. In the official code
removing stream 3 would orphan stream 4, which is made from it; here stream 4 is still made from
streams 1 and 2.

Pretrained backbone: torchvision has no HRNet, so only a local file is accepted, holding the state
dict of ``model.hrnet.backbone`` (everything but the head) of an unslimmed model with the same
config, e.g. from an earlier run; a torchvision weights name is a DanceError. (Official HRNet
ImageNet checkpoints do not load as they are: their stem and transitions are laid out differently.)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from dance.errors import DanceError
from dance.network.gates import MultiScaleModule, new_gates, slice_conv_inputs
from dance.network.models.common import ConvBNReLU, SegmentationNet, resize_bilinear
from dance.network.pretrained import load_backbone_weights
from dance.network.registry import register_model

STREAMS = ("stream2", "stream3", "stream4")  # removable; index i in a stream list is stream i+1

# One entry per stream, None where the stream is removed (or, for the gates, not gated).
Streams = list[torch.Tensor | None]
Gates = list[torch.Tensor | None]


def _gated(x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return x if gate is None else gate * x


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1
             ) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels))


def _down_path(in_channels: int, out_channels: int, steps: int) -> nn.Sequential:
    """HRNet's path to a ``2**steps`` times coarser stream: 3x3 stride-2 convs, the first
    ``steps - 1`` keeping the width (ConvBNReLU), the last changing it (conv BN, no ReLU: the
    ReLU comes after the sum of all paths)."""
    return nn.Sequential(*[ConvBNReLU(in_channels, in_channels, 3, stride=2)
                           for _ in range(steps - 1)],
                         _conv_bn(in_channels, out_channels, 3, stride=2))


class HighResolutionModule(nn.Module):
    """One HRNet module: BasicBlocks on every stream, then the fusion.

    ``fuse_layers[i][j]`` carries stream j into stream i (None for j == i: identity); removed
    streams leave None in ``branches``, in their fuse row and in every other row's column.
    """

    def __init__(self, widths: Sequence[int], num_blocks: int):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(*[BasicBlock(c, c) for _ in range(num_blocks)]) for c in widths)
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(
                None if j == i else
                _conv_bn(widths[j], widths[i], 1) if j > i else
                _down_path(widths[j], widths[i], i - j)
                for j in range(len(widths)))
            for i in range(len(widths)))

    def forward(self, xs: Streams, gates: Gates) -> Streams:
        xs = [None if b is None else b(x) for b, x in zip(self.branches, xs)]
        out: Streams = []
        for i, row in enumerate(self.fuse_layers):
            if row is None:
                out.append(None)
                continue
            y = xs[i]
            for j, path in enumerate(row):
                if path is None:
                    continue
                t = _gated(path(xs[j]), gates[j])
                y = y + (resize_bilinear(t, y.shape[-2:]) if j > i else t)
            out.append(torch.relu(y))
        return out

    def remove_stream(self, i: int) -> None:
        if i >= len(self.branches):
            return
        self.branches[i] = None
        self.fuse_layers[i] = None
        for row in self.fuse_layers:
            if row is not None:
                row[i] = None


class NewStream(nn.Module):
    """The exchange unit's extra output: a new, twice coarser stream made from every existing
    stream, ``ReLU(sum_j g_j * down_j(x_j))``."""

    def __init__(self, in_widths: Sequence[int], out_width: int):
        super().__init__()
        n = len(in_widths)
        self.paths = nn.ModuleList(_down_path(c, out_width, n - j) for j, c in enumerate(in_widths))

    def forward(self, xs: Streams, gates: Gates) -> torch.Tensor:
        return torch.relu(sum(_gated(path(x), g)
                              for path, x, g in zip(self.paths, xs, gates) if path is not None))


class HRNetBackbone(nn.Module):
    """Stem, stage 1 and the multi-resolution stages 2-4; returns the four streams (None for a
    removed one). ``layer1``, ``transitionN``, ``stageN``, ``branches`` and ``fuse_layers`` are
    named as in the official HRNet code."""

    def __init__(self, widths: Sequence[int], stem_channels: int, stage1_blocks: int,
                 blocks_per_branch: int, modules_per_stage: Sequence[int]):
        super().__init__()
        w = list(widths)
        self.stem = nn.Sequential(ConvBNReLU(3, stem_channels, 3, stride=2),
                                  ConvBNReLU(stem_channels, stem_channels, 3, stride=2))
        out1 = stem_channels * Bottleneck.expansion
        self.layer1 = nn.Sequential(
            Bottleneck(stem_channels, stem_channels, downsample=_conv_bn(stem_channels, out1, 1)),
            *[Bottleneck(out1, stem_channels) for _ in range(stage1_blocks - 1)])
        self.transition1 = nn.ModuleList([ConvBNReLU(out1, w[0], 3),
                                          ConvBNReLU(out1, w[1], 3, stride=2)])
        self.stage2 = self._stage(w[:2], blocks_per_branch, modules_per_stage[0])
        self.transition2 = NewStream(w[:2], w[2])
        self.stage3 = self._stage(w[:3], blocks_per_branch, modules_per_stage[1])
        self.transition3 = NewStream(w[:3], w[3])
        self.stage4 = self._stage(w, blocks_per_branch, modules_per_stage[2])

    @staticmethod
    def _stage(widths: Sequence[int], num_blocks: int, num_modules: int) -> nn.ModuleList:
        return nn.ModuleList(HighResolutionModule(widths, num_blocks) for _ in range(num_modules))

    @staticmethod
    def _run(stage: nn.ModuleList, xs: Streams, gates: Gates) -> Streams:
        for module in stage:
            xs = module(xs, gates)
        return xs

    def forward(self, x: torch.Tensor, gates: Gates) -> Streams:
        x = self.layer1(self.stem(x))
        xs = [None if t is None else t(x) for t in self.transition1]
        xs = self._run(self.stage2, xs, gates)
        xs = xs + [None if self.transition2 is None else self.transition2(xs, gates)]
        xs = self._run(self.stage3, xs, gates)
        xs = xs + [None if self.transition3 is None else self.transition3(xs, gates)]
        return self._run(self.stage4, xs, gates)

    def remove_stream(self, i: int) -> None:
        """Delete stream ``i`` (1..3): what creates it, its blocks, every fuse path from and to it,
        and its path into the streams created after it."""
        if i == 1:
            self.transition1[1] = None
        else:
            setattr(self, f"transition{i}", None)
        for new in (self.transition2, self.transition3):
            if new is not None and i < len(new.paths):
                new.paths[i] = None
        for stage in (self.stage2, self.stage3, self.stage4):
            for module in stage:
                module.remove_stream(i)


class HRNetV2Head(nn.Module):
    """Upsample every stream to the finest one, concat, 1x1 ConvBNReLU, 1x1 classifier."""

    def __init__(self, widths: Sequence[int], num_classes: int):
        super().__init__()
        channels = sum(widths)
        self.fuse = ConvBNReLU(channels, channels, 1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, xs: Streams, gates: Gates) -> torch.Tensor:
        size = xs[0].shape[-2:]
        feats = [xs[0]] + [resize_bilinear(_gated(x, g), size)
                           for x, g in zip(xs[1:], gates[1:]) if x is not None]
        return self.classifier(self.fuse(torch.cat(feats, dim=1)))


class HRNet(MultiScaleModule):
    """The gated multi-scale module: backbone streams and the head that fuses them, one gate per
    removable stream (``stream2``, ``stream3``, ``stream4``)."""

    def __init__(self, num_classes: int, widths: Sequence[int], stem_channels: int,
                 stage1_blocks: int, blocks_per_branch: int, modules_per_stage: Sequence[int],
                 pretrained_backbone: str | None = None):
        super().__init__()
        self.widths = tuple(int(c) for c in widths)
        self.backbone = HRNetBackbone(self.widths, stem_channels, stage1_blocks,
                                      blocks_per_branch, modules_per_stage)
        load_backbone_weights(self.backbone, pretrained_backbone, "hrnet_w18_small")
        self.head = HRNetV2Head(self.widths, num_classes)
        self.gates = new_gates(STREAMS)

    def stream_gates(self) -> Gates:
        """Per stream: its gate, or None (stream 1, and removed streams)."""
        return [None] + [self.gates.get(n) for n in STREAMS]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.stream_gates()
        return self.head(self.backbone(x, gates), gates)

    def stream_width(self, i: int) -> int:
        """Stream ``i``'s channels now (channel slimming may have narrowed it): those of its last
        block in the last stage."""
        return self.backbone.stage4[-1].branches[i][-1].bn2.num_features

    def _remove(self, names: list[str]) -> None:
        live = [0] + [STREAMS.index(n) + 1 for n in self.gates]
        drop = {STREAMS.index(n) + 1 for n in names}
        keep, start = [], 0
        for i in live:  # the head's concat holds the live streams in order
            width = self.stream_width(i)
            if i not in drop:
                keep.extend(range(start, start + width))
            start += width
        conv = self.head.fuse[0]
        self.head.fuse[0] = slice_conv_inputs(
            conv, torch.tensor(keep, dtype=torch.long, device=conv.weight.device))
        for i in sorted(drop):
            self.backbone.remove_stream(i)


class HRNetW18Small(SegmentationNet):
    def __init__(self, num_classes: int, pretrained_backbone: str | None = None,
                 widths: Sequence[int] = (18, 36, 72, 144), stem_channels: int = 64,
                 stage1_blocks: int = 2, blocks_per_branch: int = 2,
                 modules_per_stage: Sequence[int] = (1, 3, 2)):
        super().__init__()
        if len(widths) != 4 or len(modules_per_stage) != 3:
            raise DanceError(f"hrnet_w18_small needs 4 stream widths and 3 module counts (stages "
                             f"2-4), got widths={list(widths)}, "
                             f"modules_per_stage={list(modules_per_stage)}")
        self.hrnet = HRNet(num_classes, widths, stem_channels, stage1_blocks, blocks_per_branch,
                           modules_per_stage, pretrained_backbone)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.hrnet(x)


@register_model("hrnet_w18_small", head=("widths",))
def hrnet_w18_small(num_classes: int, pretrained_backbone: str | None = None,
                    widths: Sequence[int] = (18, 36, 72, 144), stem_channels: int = 64,
                    stage1_blocks: int = 2, blocks_per_branch: int = 2,
                    modules_per_stage: Sequence[int] = (1, 3, 2)) -> HRNetW18Small:
    """HRNet-W18-small-v2 + HRNetV2 head; smaller ``widths``/blocks/modules for quick tests."""
    return HRNetW18Small(num_classes, pretrained_backbone, widths, stem_channels, stage1_blocks,
                         blocks_per_branch, modules_per_stage)
