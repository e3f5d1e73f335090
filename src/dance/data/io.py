"""The one image and mask reader of the project: Pillow, and simplejpeg (libjpeg-turbo straight
into a numpy array) for JPEG images, 1.3x Pillow's speed at 1/2 scale and 2.5x at full scale on
512x1024 photos (BENCHMARKS.md)."""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dance.errors import DanceError


def max_pixels() -> int:
    """The most pixels an image or mask may have: ``DANCE_MAX_IMAGE_PIXELS``, else Pillow's
    decompression-bomb limit (about 89 megapixels, 40x a Cityscapes frame). A file whose header
    claims more is an error before anything is decoded, not gigabytes of memory."""
    text = os.environ.get("DANCE_MAX_IMAGE_PIXELS")
    if text:
        try:
            value = int(text)
        except ValueError:
            raise DanceError(f"DANCE_MAX_IMAGE_PIXELS must be an integer, got {text!r}") from None
        if value < 1:
            raise DanceError(f"DANCE_MAX_IMAGE_PIXELS must be positive, got {value}")
        return value
    return int(Image.MAX_IMAGE_PIXELS or 89_478_485)


def check_pixels(path: str | os.PathLike, height: int, width: int) -> None:
    """DanceError naming ``path`` when its header claims more than ``max_pixels()``."""
    limit = max_pixels()
    if height * width > limit:
        raise DanceError(f"{path}: {width}x{height} pixels is more than the limit of {limit:,} "
                         "(a corrupt header or a decompression bomb?); set "
                         "DANCE_MAX_IMAGE_PIXELS to allow larger images")


@contextlib.contextmanager
def open_image(path: str | os.PathLike, what: str = "image") -> Iterator[Image.Image]:
    """``Image.open`` with the pixel limit checked (``check_pixels``), and every failure as one
    DanceError line naming the file."""
    limit = max_pixels()
    try:
        with warnings.catch_warnings():  # Pillow warns above its limit; check_pixels decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = max(limit, Image.MAX_IMAGE_PIXELS or 0)
            opened = Image.open(path)
        with opened as im:
            check_pixels(path, im.size[1], im.size[0])
            yield im
    except FileNotFoundError:
        raise DanceError(f"{path}: {'mask' if what == 'mask' else 'file'} not found") from None
    except Image.DecompressionBombError as e:  # twice Pillow's limit: refused by Pillow itself
        raise DanceError(f"{path}: more pixels than the limit of {limit:,} ({e}); set "
                         "DANCE_MAX_IMAGE_PIXELS to allow larger images") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise DanceError(f"{path}: unreadable or truncated {what} ({e})") from None


def _decode(path: str | os.PathLike, mode: str) -> np.ndarray:
    with open_image(path) as im:
        im.load()
        return np.asarray(im.convert(mode))


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to an ``H x W x 3`` uint8 RGB array."""
    jpeg = _read_jpeg(path)
    return jpeg[0] if jpeg is not None else _decode(path, "RGB")


# JPEG colour spaces simplejpeg decodes to RGB itself; CMYK and YCCK files go through Pillow
_SIMPLEJPEG_SPACES = ("YCbCr", "Gray", "RGB")


def _read_jpeg(path: str | os.PathLike,
               size_for: Callable[[tuple[int, int]], tuple[int, int]] | None = None
               ) -> tuple[np.ndarray, tuple[int, int]] | None:
    """``(RGB array, stored (H, W))`` of a JPEG file by simplejpeg, at the smallest scale
    libjpeg offers that covers ``size_for(stored)``; None when the file is not a JPEG (or one
    simplejpeg does not convert), for Pillow to read."""
    try:
        import simplejpeg
    except ImportError:  # a broken install: Pillow reads JPEGs too, only slower
        return None
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"\xff\xd8":  # not a JPEG: Pillow reads it, the rest unread here
                return None
            data = b"\xff\xd8" + f.read()
    except FileNotFoundError:
        raise DanceError(f"{path}: file not found") from None
    except OSError as e:
        raise DanceError(f"{path}: unreadable image ({e})") from None
    try:
        h, w, space, _ = simplejpeg.decode_jpeg_header(data)
        if space not in _SIMPLEJPEG_SPACES:
            return None
        check_pixels(path, h, w)
        need_h, need_w = size_for((h, w)) if size_for is not None else (h, w)
        image = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min(need_h, h),
                                       min_width=min(need_w, w))
    except ValueError as e:
        raise DanceError(f"{path}: unreadable or truncated image ({e})") from None
    return image, (h, w)


def read_image_at_least(path: str | os.PathLike,
                        size_for: Callable[[tuple[int, int]], tuple[int, int]]
                        ) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image no larger than it will be used: ``size_for`` gets the stored ``(height,
    width)`` from the header and returns the size the pixels are needed at; a JPEG is then
    decoded at the smallest scale libjpeg's DCT scaling offers (simplejpeg: eighths, 1/8 to
    8/8; Pillow's ``draft`` for the JPEGs simplejpeg leaves: 1/8, 1/4, 1/2, 1) that is at
    least that on both sides, any other format at full size. Returns
    ``(H' x W' x 3 uint8 RGB, stored (H, W))``."""
    jpeg = _read_jpeg(path, size_for)
    if jpeg is not None:
        return jpeg
    with open_image(path) as im:
        w, h = im.size
        need_h, need_w = size_for((h, w))
        if im.format == "JPEG" and (need_h < h or need_w < w):
            im.draft("RGB", (max(1, need_w), max(1, need_h)))
        im.load()
        return np.asarray(im.convert("RGB")), (h, w)


def read_luma(path: str | os.PathLike) -> np.ndarray:
    """Decode an image straight to its ``H x W`` uint8 BT.601 luma (PIL's "L" conversion), for
    the luma-only complexity indicators: no RGB array is built, so scoring stays close to the
    cost of the decode itself."""
    return _decode(path, "L")


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Decode a label mask to an ``H x W`` array of its raw values (palette indices for P-mode,
    0/1 for a bilevel image). A mask of several channels or of floats is a DanceError: label ids
    are one channel of integers."""
    with open_image(path, "mask") as im:
        im.load()
        if im.mode in ("L", "P"):
            return np.asarray(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.asarray(im).astype(np.int64)
        if im.mode == "1":
            return np.asarray(im).astype(np.uint8)
        hint = " (a colour-coded label file?)" if im.mode in ("RGB", "RGBA") else ""
        raise DanceError(f"{path}: mask is a {im.mode} image; expected one channel of integer "
                         f"label ids{hint}")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` from the file header alone, without decoding pixels."""
    with open_image(path) as im:
        w, h = im.size
    return h, w


def png_bytes(array: np.ndarray, compress_level: int = 6) -> bytes:
    """``array`` (HxW or HxWx3, uint8 or uint16) encoded as a PNG file's bytes."""
    import io
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def file_key(path: str | os.PathLike) -> tuple[str, tuple[int, int, int]]:
    """Cache key of a file: its resolved path, and a stamp of its size in bytes, mtime and ctime
    in nanoseconds. The ctime catches a file replaced with its size and mtime kept (``cp -p``,
    ``rsync -a``, ``touch -r``): no program can set it back."""
    p = Path(path)
    st = p.stat()
    return str(p.resolve()), (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
