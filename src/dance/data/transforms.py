"""Joint image/mask transforms: the train and eval recipes (docs/method.md#data-policy; torchvision v2).

The train recipe is torchvision's segmentation reference (random scale, pad with ignore, random
crop, horizontal flip) with one addition: the data plan's downsampling factor ``scale``. A sample
at scale s shows the same field of view at lower resolution: the resize factor is multiplied by
s and the crop shrinks to ``scaled_crop(crop, s)``, so its pixels -- and its compute -- scale by
about s^2, and every sample of one scale has one shape (a bucket's batch stacks).

All randomness is drawn from the ``generator`` passed in, so a sample is a pure function of
(seed, epoch, index) in any worker process and after a resume.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from dance.data.labels import IGNORE_INDEX


def scaled_crop(crop: tuple[int, int], scale: float, multiple: int = 8) -> tuple[int, int]:
    """Crop size at a data-plan scale: ``crop * scale`` rounded to a multiple of ``multiple``
    (at least ``multiple``), so feature maps of strided networks stay aligned."""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return tuple(max(multiple, round(c * scale / multiple) * multiple) for c in crop)


def _check_image(image) -> None:
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be H x W x 3, got shape {tuple(image.shape)}")


def _check_shapes(image, mask) -> None:
    _check_image(image)
    if tuple(mask.shape) != tuple(image.shape[:2]):
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from image "
                         f"{tuple(image.shape[:2])}")


def _to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """HxWx3 uint8 and HxW uint8 numpy arrays (or tensors) as uint8 3xHxW / 1xHxW tv_tensors."""
    msk = torch.from_numpy(np.array(mask, copy=True)) if isinstance(mask, np.ndarray) else mask
    return _image_tensor(image), tv_tensors.Mask(msk[None])


def _image_tensor(image: np.ndarray) -> tv_tensors.Image:
    # decoded arrays are read-only views of PIL's buffer; torch wants writable memory
    img = torch.from_numpy(np.array(image, copy=True)) if isinstance(image, np.ndarray) else image
    return tv_tensors.Image(img.permute(2, 0, 1))


def _float_image(img: torch.Tensor) -> torch.Tensor:
    """uint8 3xHxW -> float32 [0, 1] (a plain tensor)."""
    return img.as_subclass(torch.Tensor).to(torch.float32).div_(255.0).contiguous()


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """An ``H x W x 3`` uint8 RGB array as the models take it: float32 3xHxW in [0, 1]."""
    _check_image(image)
    return _float_image(_image_tensor(image))


def _finish(img: torch.Tensor, msk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 3xHxW -> float32 [0, 1]; 1xHxW mask -> int64 HxW (plain tensors)."""
    return _float_image(img), msk.as_subclass(torch.Tensor)[0].to(torch.int64)


@dataclass(frozen=True)
class Draw:
    """One sample's random choices (`TrainTransform.draw`): resize to ``size``, pad by ``pad``
    (bottom, right), crop ``crop`` at ``(top, left)``, flip or not. ``decode_size``: the
    fewest pixels the image may be decoded at, the smaller of ``size`` and the image at the
    plan's scale (a zoom-in of the augmentation upsamples from the plan's resolution)."""

    size: tuple[int, int]
    decode_size: tuple[int, int]
    crop: tuple[int, int]
    pad: tuple[int, int]
    top: int
    left: int
    flip: bool


class TrainTransform:
    """Random scale, pad (image 0, mask ``ignore_index``), random crop and horizontal flip.

    ``scale_range``: the augmentation's random resize factor (uniform); ``hflip``: flip
    probability. ``__call__(image, mask, scale, generator)`` takes an HxWx3 uint8 image and HxW
    uint8 train-id mask and returns (float32 3 x h x w in [0, 1], int64 h x w) with
    ``(h, w) == scaled_crop(crop, scale)``.
    """

    def __init__(self, crop: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0),
                 hflip: float = 0.5, ignore_index: int = IGNORE_INDEX,
                 jitter_follows_scale: bool = False):
        if len(crop) != 2 or min(crop) <= 0:
            raise ValueError(f"crop must be (height, width) > 0, got {crop}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be 0 < low <= high, got {scale_range}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability, got {hflip}")
        self.crop = (int(crop[0]), int(crop[1]))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.hflip = float(hflip)
        self.ignore_index = int(ignore_index)
        # EfficientNetV2's progressive learning: weaker scale jitter on downsampled images
        self.jitter_follows_scale = bool(jitter_follows_scale)

    def __call__(self, image: np.ndarray, mask: np.ndarray, scale: float = 1.0,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        _check_shapes(image, mask)
        return self.apply(image, mask, self.draw(tuple(image.shape[:2]), scale, generator))

    def draw(self, full_hw: tuple[int, int], scale: float = 1.0,
             generator: torch.Generator | None = None) -> Draw:
        """The random choices for an image of ``full_hw`` (as stored) at plan scale ``scale``:
        known before the image is decoded, so a loader can decode no more pixels than it needs."""
        h, w = full_hw
        ch, cw = scaled_crop(self.crop, scale)
        # Always draw the same four numbers in the same order, so a generator's stream (and
        # hence every later sample drawn from it) does not depend on the image's size.
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        lo, hi = self.scale_range
        if self.jitter_follows_scale and scale < 1:  # the range shrinks towards 1 with the scale
            lo, hi = 1 - (1 - lo) * scale, 1 + (hi - 1) * scale
        # One resize for both the augmentation and the plan's scale, done in uint8.
        factor = (lo + (hi - lo) * u[0]) * scale
        size = (max(1, round(h * factor)), max(1, round(w * factor)))
        pad_h, pad_w = max(ch - size[0], 0), max(cw - size[1], 0)
        planned = (max(1, round(h * scale)), max(1, round(w * scale)))
        return Draw(size=size, decode_size=(min(size[0], planned[0]), min(size[1], planned[1])),
                    crop=(ch, cw), pad=(pad_h, pad_w),
                    top=math.floor(u[1] * (size[0] + pad_h - ch + 1)),
                    left=math.floor(u[2] * (size[1] + pad_w - cw + 1)),
                    flip=u[3] < self.hflip)

    def apply(self, image: np.ndarray, mask: np.ndarray, d: Draw,
              map_mask: Callable[[np.ndarray], np.ndarray] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The transform of ``draw``'s choices: the image resized to ``d.size`` from whatever
        size it comes at, padded, cropped, flipped; the mask's crop taken by `crop_mask`
        (``map_mask``: raw values -> train ids, applied to the crop's pixels only)."""
        _check_image(image)
        img = _image_tensor(image)
        size = list(d.size)
        if list(img.shape[-2:]) != size:
            img = F.resize(img, size, InterpolationMode.BILINEAR, antialias=True)
        pad_h, pad_w = d.pad
        if pad_h or pad_w:
            img = F.pad(img, [0, 0, pad_w, pad_h], fill=0)
        ch, cw = d.crop
        img = F.crop(img, d.top, d.left, ch, cw)
        if d.flip:
            img = F.horizontal_flip(img)
        return _float_image(img), self.crop_mask(mask, d, map_mask)

    def crop_mask(self, mask: np.ndarray, d: Draw,
                  map_mask: Callable[[np.ndarray], np.ndarray] | None = None) -> torch.Tensor:
        """``mask`` (at its stored size) nearest-resized to ``d.size``, padded with
        ``ignore_index``, cropped and flipped as ``d`` says, as int64 ``h x w``: the pixels
        of the crop are gathered straight from the mask with nearest-exact's source indices, the
        same labels as resizing the whole mask first (tested), for the crop's pixels' cost."""
        mask = np.asarray(mask)
        ch, cw = d.crop
        rows = _nearest_exact(mask.shape[0], d.size[0], d.top, ch)
        cols = _nearest_exact(mask.shape[1], d.size[1], d.left, cw)
        # whole rows first (contiguous copies), then the columns: 2-3x faster than np.ix_
        part = mask.take(rows, axis=0).take(cols, axis=1)
        if map_mask is not None:
            part = map_mask(part)
        out = np.full((ch, cw), self.ignore_index, dtype=np.int64)
        out[:len(rows), :len(cols)] = part  # the padding is at the bottom and the right
        if d.flip:
            out = out[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(out))


def _nearest_exact(stored: int, resized: int, start: int, length: int) -> np.ndarray:
    """Source indices of resized positions ``start .. start + length`` (those inside
    ``resized``) under torch's nearest-exact interpolation from ``stored`` to ``resized``
    pixels: ``min(floor((i + 0.5) * scale), stored - 1)`` with torch's float32 scale."""
    at = np.arange(start, min(start + length, resized))
    if resized == stored:
        return at
    scale = np.float32(stored) / np.float32(resized)
    src = np.floor(((at + 0.5) * np.float64(scale)).astype(np.float32)).astype(np.int64)
    return np.minimum(src, stored - 1)


class EvalTransform:
    """Evaluation recipe: no resize, no crop; (float32 3xHxW in [0, 1], int64 HxW)."""

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        _check_shapes(image, mask)
        return _finish(*_to_tensors(image, mask))
