"""torchvision's own segmentation models with their multi-scale heads gated (docs/method.md#network-slimming).

* ``deeplabv3_mobilenet_v3_large``, ``deeplabv3_resnet50``: torchvision's ASPP ``convs`` become
  the named branches ``conv1x1``, ``rate12``, ``rate24``, ``rate36`` (torchvision's rates) and
  ``pool``; its ``project`` is the consumer. The rest of ``DeepLabHead`` follows as ``head``.
* ``lraspp_mobilenet_v3_large``: LR-ASPP's output is a sum of two paths, and each is a branch:
  ``context`` (the 1/16 features through ``cbr`` times the global-pooling attention ``scale``,
  upsampled to 1/8, then ``high_classifier``) and ``detail`` (``low_classifier`` on the 1/8
  features). Either one may be removed, not both. ``cbr`` and ``scale`` are not separate
  branches: they meet in a product, where a zero gate would silence the whole path, so they
  live and die together as ``context``.

Built with ``weights=None`` and ``aux_loss`` off; the backbone is loaded from
``pretrained_backbone`` (see ``dance.network.pretrained``). Forward returns the logits tensor at
input size, not torchvision's dict; inputs are [0, 1] RGB normalised inside.
"""
from __future__ import annotations

import sys

import torch
import torchvision
from torch import nn
from torchvision.models.segmentation import deeplabv3 as tv_deeplabv3
from torchvision.models.segmentation import lraspp as tv_lraspp

from dance.network.gates import GatedBranches
from dance.network.models.common import SegmentationNet, resize_bilinear
from dance.network.pretrained import load_backbone_weights
from dance.network.registry import register_model


def gated_aspp(aspp: nn.Module) -> GatedBranches:
    """torchvision's ASPP (or segmentation_models.pytorch's, built alike: ``convs`` concatenated,
    then ``project``) as a GatedBranches sharing its modules (so its weights)."""
    names = ["conv1x1"]
    names += [f"rate{_first_conv(conv).dilation[0]}" for conv in aspp.convs[1:-1]]
    names.append("pool")
    out_channels = aspp.project[0].in_channels // len(aspp.convs)
    return GatedBranches(dict(zip(names, aspp.convs)), {n: out_channels for n in names},
                         aspp.project, global_branches=["pool"])


class TorchvisionDeepLabV3(SegmentationNet):
    def __init__(self, model: tv_deeplabv3.DeepLabV3):
        super().__init__()
        self.backbone = model.backbone
        self.aspp = gated_aspp(model.classifier[0])
        self.head = nn.Sequential(*list(model.classifier)[1:])  # DeepLabHead minus its ASPP

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.aspp(self.backbone(x)["out"]))


class LRASPPContext(nn.Module):
    """LR-ASPP's 1/16 path: ``cbr(high) * scale(high)``, up to 1/8, ``high_classifier``."""

    def __init__(self, head: tv_lraspp.LRASPPHead):
        super().__init__()
        self.cbr, self.scale, self.classifier = head.cbr, head.scale, head.high_classifier

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        high, low = features["high"], features["low"]
        return self.classifier(resize_bilinear(self.cbr(high) * self.scale(high),
                                               low.shape[-2:]))


class LRASPPDetail(nn.Module):
    """LR-ASPP's 1/8 path: ``low_classifier`` on the low-level features."""

    def __init__(self, head: tv_lraspp.LRASPPHead):
        super().__init__()
        self.classifier = head.low_classifier

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(features["low"])


def _first_conv(branch: nn.Module) -> nn.Conv2d:
    """A branch's first convolution (a separable branch's depthwise one carries its rate)."""
    return next(m for m in branch.modules() if isinstance(m, nn.Conv2d))


def gated_lraspp(head: tv_lraspp.LRASPPHead) -> GatedBranches:
    """torchvision's LR-ASPP head as a GatedBranches of its two summed paths (sharing its
    modules); it takes the backbone's feature dict, as the head does."""
    return GatedBranches({"context": LRASPPContext(head), "detail": LRASPPDetail(head)})


def gate_heads(model: nn.Module) -> list[str]:
    """Replace, in place, every torchvision ``ASPP`` and ``LRASPPHead`` inside ``model`` (any
    model: torchvision's own, or one of yours that uses them), and segmentation_models.pytorch's
    ``ASPP`` (DeepLabV3, DeepLabV3+) when that library is loaded, by its gated form, which shares
    the original's modules and so its weights and its output. Returns the replaced paths."""
    kinds = [(tv_deeplabv3.ASPP, gated_aspp), (tv_lraspp.LRASPPHead, gated_lraspp)]
    smp = sys.modules.get("segmentation_models_pytorch.decoders.deeplabv3.decoder")
    if smp is not None and hasattr(smp, "ASPP"):  # an smp model is only made once it is loaded
        kinds.append((smp.ASPP, gated_aspp))
    found = [(path, gate) for path, m in model.named_modules()
             for kind, gate in kinds if isinstance(m, kind)]
    for path, gate in found:
        parent, _, attr = path.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, attr, gate(getattr(owner, attr)))
    return [path for path, _ in found]


class TorchvisionLRASPP(SegmentationNet):
    def __init__(self, model: tv_lraspp.LRASPP):
        super().__init__()
        self.backbone = model.backbone
        # The two paths are summed: a GatedBranches without projection.
        self.lraspp = gated_lraspp(model.classifier)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lraspp(self.backbone(x))


def _mobilenet_v3_large(pretrained_backbone: str | None) -> nn.Module:
    net = torchvision.models.mobilenet_v3_large(weights=None, dilated=True)
    load_backbone_weights(net, pretrained_backbone, "mobilenet_v3_large")
    return net


# torchvision's model builders download on their own; its private assemblers take a backbone we
# have loaded ourselves (offline-safe), and are what the public builders call.
@register_model("deeplabv3_mobilenet_v3_large")
def deeplabv3_mobilenet_v3_large(num_classes: int,
                                 pretrained_backbone: str | None = None) -> TorchvisionDeepLabV3:
    backbone = _mobilenet_v3_large(pretrained_backbone)
    return TorchvisionDeepLabV3(tv_deeplabv3._deeplabv3_mobilenetv3(backbone, num_classes, False))


@register_model("deeplabv3_resnet50")
def deeplabv3_resnet50(num_classes: int,
                       pretrained_backbone: str | None = None) -> TorchvisionDeepLabV3:
    backbone = torchvision.models.resnet50(weights=None,
                                           replace_stride_with_dilation=[False, True, True])
    load_backbone_weights(backbone, pretrained_backbone, "resnet50")
    return TorchvisionDeepLabV3(tv_deeplabv3._deeplabv3_resnet(backbone, num_classes, False))


@register_model("lraspp_mobilenet_v3_large")
def lraspp_mobilenet_v3_large(num_classes: int,
                              pretrained_backbone: str | None = None) -> TorchvisionLRASPP:
    backbone = _mobilenet_v3_large(pretrained_backbone)
    return TorchvisionLRASPP(tv_lraspp._lraspp_mobilenetv3(backbone, num_classes))
