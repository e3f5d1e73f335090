"""DANCE inside a training loop of your own (docs/own_loop.md).

`dance train` is one loop over these pieces; a loop of your own takes the same ones:

* ``score_images``: a complexity score per item of any map-style dataset of ``(image, mask)``;
* ``dance.plan``: the data plan (per image and epoch a scale, a keep probability, a loss weight);
* ``PlannedLoader``: batches of one scale each, the images the plan drops left out, each batch
  with its images' loss weights; it keeps the cost account (``charge``) and, with
  ``adaptive=True``, re-plans from what is still hard (``observe``);
* ``dance.weighted_cross_entropy``: the weighted loss;
* ``slimmable`` + ``NetworkSlimmer`` + ``rebuild_optimizer``: gates on the model's multi-scale
  modules, the cost-aware sparsity term, and structural removal of branches and channels at the
  scheduled points.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from dance.data.loader import collate_planned
from dance.data.plan import DataSlimmingPlan, Hardness
from dance.data.sampler import BucketedBatchSampler
from dance.data.transforms import scaled_crop
from dance.engine.cost import CostLedger
from dance.errors import DanceError
from dance.network.flops import meta_copy


def _first(item):
    return item[0]


def score_images(dataset, indicator: str = "si",
                 image: Callable = _first) -> np.ndarray:
    """One complexity score per item of ``dataset`` (in index order): ``indicator`` on
    ``image(item)`` (default ``item[0]``), which must be an ``H x W x 3`` uint8 array or a
    ``C x H x W`` float tensor in [0, 1] (score before normalising). Items drawn with random
    augmentation score their augmented view: score a copy of the dataset without it."""
    from dance.data.complexity import IMAGE_INDICATORS, check_indicators, spatial_complexity
    (indicator,) = check_indicators(indicator)
    if indicator not in IMAGE_INDICATORS:
        raise DanceError(f"score_images computes image indicators "
                         f"({', '.join(IMAGE_INDICATORS)}); "
                         f"{indicator!r} needs the mask in train ids: use "
                         f"dance.spatial_complexity(image, {indicator!r}, mask=...)")
    return np.array([spatial_complexity(image(dataset[i]), indicator)
                     for i in range(len(dataset))], dtype=np.float64)


def _image(x, index: int) -> torch.Tensor:
    if isinstance(x, np.ndarray) or not isinstance(x, torch.Tensor):
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[-1] != 3:
            raise DanceError(f"item {index}: image must be a C x H x W tensor or an H x W x 3 "
                             f"array, got shape {x.shape}")
        x = torch.from_numpy(np.array(x, copy=True)).permute(2, 0, 1)
    if x.ndim != 3:
        raise DanceError(f"item {index}: image must be C x H x W, got shape {tuple(x.shape)}")
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def _mask(y, index: int, hw: tuple[int, int]) -> torch.Tensor:
    y = torch.as_tensor(np.array(y, copy=True)) if not isinstance(y, torch.Tensor) else y
    if y.ndim == 3 and y.shape[0] == 1:
        y = y[0]
    if tuple(y.shape) != hw:
        raise DanceError(f"item {index}: mask shape {tuple(y.shape)} differs from the image's "
                         f"{hw}")
    return y.long()


class ScaledDataset(torch.utils.data.Dataset):
    """Any map-style dataset of ``(image, mask)`` items, read by the sampler's keys
    ``(index, scale, epoch)``: the item, resized to ``scale`` of its size (each side rounded to
    a multiple of ``multiple``; the image antialiased bilinear, the mask nearest).

    ``image``: a ``C x H x W`` tensor (uint8 becomes float in [0, 1]) or an ``H x W x 3`` array;
    ``mask``: ``H x W`` class ids (tensor, array or PIL image). Items of one batch must have one
    size at scale 1 (crop them to one size in your dataset, as for any batched training).
    """

    def __init__(self, dataset, multiple: int = 8):
        self.dataset = dataset
        self.multiple = multiple

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, float, int]) -> dict:
        index, scale, _ = key
        index, scale = int(index), float(scale)
        item = self.dataset[index]
        if not isinstance(item, Sequence) or len(item) < 2:
            raise DanceError(f"item {index} of {type(self.dataset).__name__} is not an "
                             f"(image, mask) pair")
        x = _image(item[0], index)
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        y = _mask(item[1], index, hw)
        if scale != 1.0:
            size = list(scaled_crop(hw, scale, self.multiple))
            x = TF.resize(x, size, antialias=True)
            y = TF.resize(y[None], size, interpolation=TF.InterpolationMode.NEAREST)[0]
        return {"image": x.contiguous(), "mask": y, "index": index, "scale": scale,
                "full_hw": hw}


def collate_scaled(batch: Sequence[dict]) -> dict:
    """Stack a batch of one scale; ``full_hw``: the batch's item size at scale 1."""
    sizes = {b["full_hw"] for b in batch}
    if len(sizes) > 1:
        raise DanceError(f"a batch holds items of sizes {sorted(sizes)} at scale 1; crop every "
                         f"item of the dataset to one size")
    out = collate_planned(batch)
    out["full_hw"] = batch[0]["full_hw"]
    return out


class PlannedLoader:
    """Batches of ``dataset`` by ``plan``: per epoch, each batch of one scale, the images the plan
    drops this epoch left out, and each batch's loss weights (docs/own_loop.md).

    Call ``set_epoch(epoch)`` before each epoch (``epoch`` 0-based, of ``epochs``). A batch is a
    dict: ``image`` (N x C x h x w), ``mask`` (N x h x w), ``weight`` (N, for
    ``weighted_cross_entropy``), ``index`` (the items' indices), ``scale`` and ``full_hw``.
    ``charge(model, batch)`` after each step keeps the training-FLOPs account
    (``realised_cost``: a fraction of the plain run of as many epochs). With ``adaptive=True``,
    ``observe(batch, per_image_loss)`` after each step, and each epoch re-plans from the
    images' hardness, as `dance train` does. ``rank``/``world_size``: every DDP rank builds the
    same loader and takes its slice of each batch. Other keywords go to
    ``torch.utils.data.DataLoader`` (``num_workers``, ``pin_memory``, ...).
    """

    def __init__(self, dataset, plan: DataSlimmingPlan, batch_size: int, epochs: int, *,
                 seed: int = 0, adaptive: bool = False, hardness_alpha: float = 0.5,
                 hardness_momentum: float = 0.7, multigrid: bool = False, rank: int = 0,
                 world_size: int = 1, **loader_kwargs):
        if not isinstance(plan, DataSlimmingPlan):
            raise DanceError(f"plan must be a DataSlimmingPlan (from dance.plan), got "
                             f"{type(plan).__name__}")
        if len(dataset) != len(plan.per_image):
            raise DanceError(f"the plan covers {len(plan.per_image)} images, the dataset has "
                             f"{len(dataset)}: make the plan from this dataset's scores")
        for bad in ("batch_size", "batch_sampler", "sampler", "shuffle", "drop_last",
                    "collate_fn"):
            if bad in loader_kwargs:
                raise DanceError(f"PlannedLoader sets {bad} itself (the plan decides the batches)")
        if not 0 <= hardness_momentum < 1:
            raise DanceError(f"hardness_momentum must be in [0, 1), got {hardness_momentum!r}")
        self.plan0 = self.plan = plan
        self.epochs = epochs
        self.sampler = BucketedBatchSampler(plan, batch_size, epochs, seed, rank, world_size,
                                            multigrid)
        self.loader = torch.utils.data.DataLoader(
            ScaledDataset(dataset), batch_sampler=self.sampler, collate_fn=collate_scaled,
            **loader_kwargs)
        self.hardness = Hardness(len(dataset)) if adaptive else None
        self.hardness_alpha = hardness_alpha
        self.hardness_momentum = hardness_momentum
        self.ledger = CostLedger()
        self._reference: nn.Module | None = None
        self.epoch = -1
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s policy (with ``adaptive``, re-planned from the epochs before)."""
        if self.hardness is not None and epoch != self.epoch:
            self.hardness.end_epoch(self.hardness_momentum)
            filled = self.hardness.filled()
            if filled is not None:
                self.plan = self.plan0.replan(filled, alpha=self.hardness_alpha)
        policy = self.plan.epoch_policy(epoch, self.epochs)
        self.epoch = epoch
        self.sampler.plan = self.plan
        self.sampler.set_epoch(epoch)
        self.weights = torch.as_tensor(policy.weight, dtype=torch.float32)
        self.mean_scale = policy.mean_scale
        self._full_factor = self.sampler.full_factor(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            batch["weight"] = self.weights[batch["index"]]
            yield batch

    def observe(self, batch: dict, per_image_loss: torch.Tensor) -> None:
        """Hand over a step's per-image losses (``weighted_cross_entropy``'s second value)."""
        if self.hardness is None:
            raise DanceError("observe needs PlannedLoader(..., adaptive=True)")
        self.hardness.observe(batch["index"].cpu().numpy(),
                              per_image_loss.detach().float().cpu().numpy())

    def charge(self, model: nn.Module, batch: dict) -> None:
        """Count one optimizer step on ``batch`` of ``model`` as it is now. The plain run is
        priced on the model as it was at the first charge (before any slimming)."""
        if self._reference is None:
            self._reference = meta_copy(model)
        self.ledger.add_step(model, tuple(batch["image"].shape), tuple(batch["full_hw"]),
                             self._full_factor, self._reference)
        self.ledger.epochs_trained += 1 / max(len(self), 1)

    @property
    def realised_cost(self) -> float:
        """The data plan's training FLOPs so far over the plain run's (every image at full size,
        on the unslimmed model), for the epochs trained."""
        return self.ledger.realised_cost

    @property
    def total_cost(self) -> float:
        """As ``realised_cost``, with each step at the FLOPs of the model as it was (network
        slimming's saving counted)."""
        return self.ledger.total_cost


def slimmable(model: nn.Module, num_classes: int) -> nn.Module:
    """Prepare a model of your own for ``NetworkSlimmer``, in place, and return it.

    Every torchvision ``ASPP`` and ``LRASPPHead`` inside it gets a gate per branch (same weights,
    same output; ``dance.branches(model)`` lists them), and the model gets a record of what
    slimming removes (``model.dance_arch.removed``, to rebuild a slimmed model's shapes on a fresh
    copy with ``dance.replay``). ``num_classes``: the logits' channels, which channel slimming
    leaves alone. A model without a known multi-scale module can still be channel-slimmed.
    """
    from dance.network.models.torchvision_adapters import gate_heads
    from dance.network.registry import Architecture
    if not isinstance(model, nn.Module):
        raise DanceError(f"slimmable needs a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise DanceError(f"num_classes must be a positive int, got {num_classes!r}")
    arch = getattr(model, "dance_arch", None)
    if arch is not None and arch.num_classes != num_classes:
        raise DanceError(f"{type(model).__name__} was made for {arch.num_classes} classes, "
                         f"not {num_classes}")
    gate_heads(model)
    if arch is None:
        model.dance_arch = Architecture.custom(model, num_classes)
    return model
