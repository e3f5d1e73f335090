"""Segmentation metrics from one confusion matrix (``miou``, ``per_class_iou``, ``pixel_acc``).

A confusion matrix is a sufficient statistic: matrices of disjoint data add up to the matrix of
all the data, which is what lets DDP ranks ``all_reduce`` (SUM) theirs before computing mIoU.
IoU conventions (the usual ones for Cityscapes-style benchmarks, and torchmetrics'
``MulticlassJaccardIndex(average="macro")``): a class absent from both the targets and the
predictions has no IoU (NaN) and is left out of the mean; a class predicted but never present
in the targets has IoU 0. mIoU and pixel accuracy are in points (0-100).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from dance.data.labels import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates a (C, C) int64 matrix: rows are targets, columns predictions."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device=None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.matrix.zero_()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and target class maps (same shape, e.g. (N, H, W) ints);
        pixels whose target is ``ignore_index`` are left out."""
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} differs from target {tuple(target.shape)}")
        c = self.num_classes
        pred = pred.to(self.matrix.device, torch.int64).reshape(-1)
        target = target.to(self.matrix.device, torch.int64).reshape(-1)
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if target.numel() == 0:
            return
        # One bounds check per batch: an out-of-range id would silently land in another cell.
        lo = torch.minimum(pred.min(), target.min()).item()
        hi = torch.maximum(pred.max(), target.max()).item()
        if lo < 0 or hi >= c:
            raise ValueError(f"class ids must be in [0, {c}) or {self.ignore_index} (ignore), "
                             f"found values in [{lo}, {hi}]")
        self.matrix += torch.bincount(target * c + pred, minlength=c * c).reshape(c, c)

    def all_reduce(self) -> None:
        """Sum the matrices of all DDP ranks (a no-op outside torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def iou(self) -> torch.Tensor:
        """Per-class IoU in [0, 1] (float64); NaN for a class absent in targets and predictions."""
        m = self.matrix.to(torch.float64)
        tp = m.diagonal()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))

    def miou(self) -> float:
        """Mean IoU over the classes that have one, in points (NaN when there is no data)."""
        iou = self.iou()
        valid = ~iou.isnan()
        return float(iou[valid].mean() * 100) if bool(valid.any()) else math.nan

    def pixel_acc(self) -> float:
        """Fraction of valid pixels predicted correctly, in points (NaN when there is no data)."""
        total = int(self.matrix.sum())
        return 100.0 * int(self.matrix.diagonal().sum()) / total if total else math.nan

    def summary(self, class_names: Sequence[str] | None = None) -> dict:
        """``{"miou", "per_class_iou", "pixel_acc"}`` in points, JSON-ready: a class without an
        IoU is ``None``; ``per_class_iou`` maps name -> value when ``class_names`` is given."""
        per_class = [None if math.isnan(v) else 100.0 * v for v in self.iou().tolist()]
        if class_names is not None:
            if len(class_names) != self.num_classes:
                raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
            per_class = dict(zip(class_names, per_class))
        miou, acc = self.miou(), self.pixel_acc()
        return {"miou": None if math.isnan(miou) else miou, "per_class_iou": per_class,
                "pixel_acc": None if math.isnan(acc) else acc}
