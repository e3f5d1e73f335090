"""The segmentation losses: the weighted loss of the data policy (docs/method.md#data-policy),
and the class-balanced loss importance may be measured on (docs/method.md#channel-slimming).

The weighted loss: per image first (mean cross-entropy over its valid pixels, so a downsampled
image is not under-weighted by its pixel count), then the weighted mean over images:
``loss = Σ_i w_i · CE_i / Σ_i w_i`` over images with at least one valid pixel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dance.data.labels import IGNORE_INDEX


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                           weights: torch.Tensor | None = None,
                           ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, per_image)``: the scalar loss and each image's detached mean CE, shape (N,).

    An image without valid pixels contributes nothing and has per-image loss 0; a batch of such
    images gives loss 0 that still has a (zero) gradient, never NaN.
    """
    n = logits.shape[0]
    ce = _pixel_cross_entropy(logits, target, ignore_index)
    valid = (target != ignore_index).flatten(1)
    count = valid.sum(1)
    per_image = ce.flatten(1).sum(1) / count.clamp(min=1)
    w = (torch.ones(n, device=logits.device) if weights is None
         else weights.to(device=logits.device, dtype=torch.float32))
    if w.shape != (n,):
        raise ValueError(f"weights shape {tuple(w.shape)} does not match batch size {n}")
    w = w * (count > 0)
    loss = (w * per_image).sum() / w.sum().clamp(min=torch.finfo(torch.float32).tiny)
    return loss, per_image.detach()


def class_balanced_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The mean over the classes present in ``target`` of each class's mean cross-entropy over
    its pixels: every class counts alike, as in mIoU, however few pixels it covers. A batch
    without valid pixels gives 0 that still has a (zero) gradient, never NaN."""
    # 0 at ignored pixels, so they add nothing to the sum of the class they are filed under
    ce = _pixel_cross_entropy(logits, target, ignore_index)
    valid = target != ignore_index
    classes = torch.where(valid, target, 0).flatten()
    n = logits.shape[1]
    sums = torch.zeros(n, device=ce.device).index_add(0, classes, ce.flatten())
    counts = torch.zeros(n, device=ce.device).index_add(0, classes, valid.flatten().float())
    present = counts > 0
    if not bool(present.any()):
        return ce.sum() * 0.0
    return (sums[present] / counts[present]).mean()


def _pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                         ignore_index: int) -> torch.Tensor:
    """Each pixel's cross-entropy in float32 (0 at ignored pixels), shape of ``target``."""
    if target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits "
                         f"{tuple(logits.shape)}")
    # float32 sums: half-precision sums over a whole image overflow or lose the small terms
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none").float()
