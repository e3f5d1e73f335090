"""Spatial complexity of an image and its label mask (docs/method.md#complexity-indicators).

Every indicator is one scalar per image, computed at native resolution with vectorised numpy.
Image indicators work on the BT.601 luma rounded to 8 bits (the Y plane ITU-T P.910 measures):

- ``si``: P.910 Spatial Information, the standard deviation over pixels of the Sobel gradient
  magnitude of the luma (0-255 scale, unnormalised 3x3 Sobel kernels, interior pixels only).
- ``gradient``: the mean of that Sobel magnitude.
- ``edges``: the fraction of interior pixels whose Sobel magnitude is at least
  ``EDGE_THRESHOLD`` (128, the response of a clean step of 32 grey levels): a fixed threshold,
  so the score compares across images and datasets, unlike Canny's per-image hysteresis.
- ``entropy``: Shannon entropy in bits of the 256-bin luma histogram.
- ``jpeg``: bytes per pixel of the RGB image re-encoded by PIL as JPEG at quality 75.

Label indicators need the mask in train ids (``ignore_index`` pixels are left out):

- ``label_boundary``: fraction of valid pixels with a valid 4-neighbour of another class.
- ``label_aliasing``: fraction of valid pixels whose class changes when the mask is
  nearest-downsampled by ``scale`` and upsampled back -- what a training scale of ``scale``
  costs the image's labels (docs/method.md#data-policy). Nearest uses pixel centres (PIL ``NEAREST``, torch
  ``nearest-exact``). A mask with no valid pixel scores 0 on both.
"""
from __future__ import annotations

import io
import math
import sys
from collections.abc import Iterable

import numpy as np
from PIL import Image

from dance.data.labels import IGNORE_INDEX
from dance.errors import DanceError

IMAGE_INDICATORS = ("si", "gradient", "edges", "entropy", "jpeg")
LABEL_INDICATORS = ("label_boundary", "label_aliasing")
INDICATORS = IMAGE_INDICATORS + LABEL_INDICATORS
# Raise when an indicator's formula changes: score caches made before are then not used
INDICATORS_VERSION = 1

EDGE_THRESHOLD = 128.0
JPEG_QUALITY = 75

_SOBEL_INDICATORS = frozenset(("si", "gradient", "edges"))
LUMA_INDICATORS = _SOBEL_INDICATORS | {"entropy"}  # computable from the luma alone


def check_indicators(indicators: str | Iterable[str]) -> tuple[str, ...]:
    """Validate indicator names (a single name or several); duplicates are dropped, order kept."""
    names = (indicators,) if isinstance(indicators, str) else tuple(indicators)
    for name in names:
        if name not in INDICATORS:
            raise DanceError(f"unknown complexity indicator {name!r}; "
                             f"expected one of {', '.join(INDICATORS)}")
    if not names:
        raise DanceError("no complexity indicator given")
    return tuple(dict.fromkeys(names))


def as_rgb_uint8(image) -> np.ndarray:
    """An image as an ``H x W x 3`` (or ``H x W`` grey) uint8 numpy array.

    Accepts numpy arrays and torch tensors shaped ``H x W``, ``H x W x C`` or ``C x H x W``
    (C in 1, 3, 4; channels-last wins when both readings fit; alpha is dropped) and a leading
    batch axis of 1. Integer images are 0-255; floating images are in [0, 1], the model's input
    convention, and are rounded to 8 bits so a tensor and its uint8 source score alike.
    """
    torch = sys.modules.get("torch")  # only a caller that already imported torch can pass a tensor
    if torch is not None and isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        arr = arr[..., 0] if arr.shape[-1] == 1 else arr[..., :3]
    if arr.ndim not in (2, 3) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DanceError(f"image of shape {tuple(np.shape(image))} is not HxW, HxWxC or CxHxW")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        if not (arr.min() >= 0.0 and arr.max() <= 1.0):  # 0-255 floats would saturate; NaN
            raise DanceError(f"float image has values outside [0, 1] "
                             f"({arr.min():g}..{arr.max():g}); pass uint8 0-255 or floats in [0, 1]")
        return np.ascontiguousarray(np.rint(arr * 255.0).astype(np.uint8))
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DanceError(f"image of dtype {arr.dtype} has values outside 0..255")
        return np.ascontiguousarray(arr.astype(np.uint8))
    raise DanceError(f"image of dtype {arr.dtype} is neither uint8 nor float in [0, 1]")


def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma (0.299 R + 0.587 G + 0.114 B) rounded to uint8, by PIL's "L" conversion."""
    if rgb.ndim == 2:
        return rgb
    return np.asarray(Image.fromarray(rgb).convert("L"))


def sobel_magnitude_squared(y: np.ndarray) -> np.ndarray:
    """Squared 3x3 Sobel gradient magnitude of the interior ``(H-2) x (W-2)`` pixels, float32.

    Separable: a central difference along one axis and a [1, 2, 1] smoothing along the other,
    in int16 (exact for 8-bit input), squared in float32 (integers below 2**24: still exact).
    """
    y = y.astype(np.int16)
    dx = y[:, 2:] - y[:, :-2]
    gx = dx[:-2] + dx[2:]
    gx += dx[1:-1]
    gx += dx[1:-1]
    sy = y[:, :-2] + y[:, 2:]
    sy += y[:, 1:-1]
    sy += y[:, 1:-1]
    gy = sy[2:] - sy[:-2]
    mag2 = gx.astype(np.float32)
    mag2 *= mag2
    gy2 = gy.astype(np.float32)
    gy2 *= gy2
    mag2 += gy2
    return mag2


def histogram_entropy_bits(values: np.ndarray, bins: int = 256) -> float:
    """Shannon entropy in bits of the histogram of small non-negative integers."""
    counts = np.bincount(values.ravel(), minlength=bins)
    p = counts[counts > 0] / values.size
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def jpeg_bytes_per_pixel(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> float:
    """Size of the image re-encoded as JPEG by PIL, in bytes per pixel."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.tell() / (rgb.shape[0] * rgb.shape[1])


def label_boundary(mask: np.ndarray, ignore_index: int = IGNORE_INDEX) -> float:
    """Fraction of valid mask pixels that have a valid 4-neighbour of another class."""
    m = np.asarray(mask)
    valid = m != ignore_index
    n_valid = int(np.count_nonzero(valid))
    if n_valid == 0:
        return 0.0
    # A pair of valid 4-neighbours with different classes marks both pixels as boundary.
    across = (m[:, 1:] != m[:, :-1]) & valid[:, 1:] & valid[:, :-1]
    down = (m[1:] != m[:-1]) & valid[1:] & valid[:-1]
    boundary = np.zeros(m.shape, dtype=bool)
    boundary[:, 1:] |= across
    boundary[:, :-1] |= across
    boundary[1:] |= down
    boundary[:-1] |= down
    return np.count_nonzero(boundary) / n_valid


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """Source index of each output pixel for pixel-centre nearest resizing (PIL NEAREST)."""
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def label_aliasing(mask: np.ndarray, scale: float = 0.5, ignore_index: int = IGNORE_INDEX) -> float:
    """Fraction of valid mask pixels whose class changes after a nearest round trip at ``scale``."""
    if not 0.0 < scale <= 1.0:
        raise DanceError(f"label_aliasing scale must be in (0, 1], got {scale}")
    m = np.asarray(mask)
    h, w = m.shape
    valid = m != ignore_index
    n_valid = int(np.count_nonzero(valid))
    if n_valid == 0:
        return 0.0
    h_small, w_small = max(1, round(h * scale)), max(1, round(w * scale))
    # Down then up is one gather: each full-size pixel reads the source of its small pixel.
    rows = _nearest_index(h_small, h)[_nearest_index(h, h_small)]
    cols = _nearest_index(w_small, w)[_nearest_index(w, w_small)]
    round_trip = m[rows[:, None], cols[None, :]]
    return np.count_nonzero((round_trip != m) & valid) / n_valid


def all_indicators(image=None, mask=None, indicators: Iterable[str] | None = None,
                   scale: float = 0.5, ignore_index: int = IGNORE_INDEX) -> dict[str, float]:
    """Several indicators of one image, sharing one luma and one Sobel pass
    (docs/method.md#complexity-indicators).

    ``indicators=None`` means every indicator the inputs allow: all of them with a mask, the
    image ones without. ``image`` may be None when only label indicators are asked for.
    """
    if indicators is None:
        indicators = INDICATORS if mask is not None else IMAGE_INDICATORS
    names = check_indicators(indicators)
    wanted = set(names)
    if wanted & set(IMAGE_INDICATORS) and image is None:
        raise DanceError(f"indicators {', '.join(n for n in names if n in IMAGE_INDICATORS)} "
                         "need an image")
    if wanted & set(LABEL_INDICATORS) and mask is None:
        raise DanceError(f"indicators {', '.join(n for n in names if n in LABEL_INDICATORS)} "
                         "need a label mask")
    out: dict[str, float] = {}
    if wanted & set(IMAGE_INDICATORS):
        rgb = as_rgb_uint8(image)
        if wanted & LUMA_INDICATORS:
            y = luma(rgb)
        if wanted & _SOBEL_INDICATORS:
            if min(y.shape) < 3:  # no interior pixel: no gradient to measure
                out.update(si=0.0, gradient=0.0, edges=0.0)
            else:
                mag2 = sobel_magnitude_squared(y)
                n = mag2.size
                out["edges"] = np.count_nonzero(mag2 >= EDGE_THRESHOLD ** 2) / n
                # si = sqrt(E[m^2] - E[m]^2): E[m^2] sums exact integers, so this one-pass form
                # loses nothing to cancellation that matters and skips std's extra passes.
                mean_mag2 = mag2.sum(dtype=np.float64) / n
                mean_mag = np.sqrt(mag2, out=mag2).sum(dtype=np.float64) / n
                out["gradient"] = mean_mag
                out["si"] = math.sqrt(max(mean_mag2 - mean_mag * mean_mag, 0.0))
        if "entropy" in wanted:
            out["entropy"] = histogram_entropy_bits(y)
        if "jpeg" in wanted:
            out["jpeg"] = jpeg_bytes_per_pixel(rgb)
    if mask is not None and wanted & set(LABEL_INDICATORS):
        m = np.asarray(mask)
        if m.ndim != 2:
            raise DanceError(f"label mask of shape {m.shape} is not HxW")
        if "label_boundary" in wanted:
            out["label_boundary"] = label_boundary(m, ignore_index)
        if "label_aliasing" in wanted:
            out["label_aliasing"] = label_aliasing(m, scale, ignore_index)
    return {name: float(out[name]) for name in names}


def spatial_complexity(image, indicator: str = "si", mask=None, scale: float = 0.5,
                       ignore_index: int = IGNORE_INDEX) -> float:
    """One complexity score of one image (docs/method.md#complexity-indicators); see the module
    docstring for definitions.

    ``image``: ``H x W x 3`` uint8 array or tensor (``C x H x W`` and float [0, 1] accepted, see
    ``as_rgb_uint8``). ``mask``: ``H x W`` train ids, needed by the label indicators.
    """
    if not isinstance(indicator, str):
        raise DanceError(f"indicator must be one name, got {indicator!r}")
    image_needed = indicator in IMAGE_INDICATORS
    return all_indicators(image if image_needed else None, mask, (indicator,), scale=scale,
                          ignore_index=ignore_index)[indicator]


__all__ = [
    "EDGE_THRESHOLD",
    "IMAGE_INDICATORS",
    "INDICATORS",
    "LABEL_INDICATORS",
    "all_indicators",
    "as_rgb_uint8",
    "check_indicators",
    "label_aliasing",
    "label_boundary",
    "spatial_complexity",
]
