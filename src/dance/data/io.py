"""The one image and mask reader of the project (PIL)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dance.errors import DanceError


def _decode(path: str | os.PathLike, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert(mode))
    except FileNotFoundError:
        raise DanceError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DanceError(f"{path}: unreadable or truncated image ({e})") from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to an ``H x W x 3`` uint8 RGB array."""
    return _decode(path, "RGB")


def read_luma(path: str | os.PathLike) -> np.ndarray:
    """Decode an image straight to its ``H x W`` uint8 BT.601 luma (PIL's "L" conversion), for
    the luma-only complexity indicators: no RGB array is built, so scoring stays close to the
    cost of the decode itself."""
    return _decode(path, "L")


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Decode a label mask to an ``H x W`` array of its raw values (palette indices for P-mode)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("L", "P"):
                arr = np.asarray(im)
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im).astype(np.int64)
            elif im.mode in ("RGB", "RGBA"):
                raise DanceError(
                    f"{path}: mask is a {im.mode} image; expected one channel of label ids "
                    "(a colour-coded label file?)"
                )
            else:
                arr = np.asarray(im.convert("L"))
    except FileNotFoundError:
        raise DanceError(f"{path}: mask not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DanceError(f"{path}: unreadable or truncated mask ({e})") from None
    return arr


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` from the file header alone, without decoding pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise DanceError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DanceError(f"{path}: unreadable image ({e})") from None
    return h, w


def file_key(path: str | os.PathLike) -> tuple[str, int, int]:
    """Cache key of a file: resolved path, size in bytes and mtime in nanoseconds."""
    p = Path(path)
    st = p.stat()
    return str(p.resolve()), st.st_size, st.st_mtime_ns
