"""An opt-in cache of decoded pixels on disk, for datasets whose files cost more to decode than to
train on (docs/datasets.md#decode-cache).

A PNG frame of Cityscapes takes tens of milliseconds to inflate whatever scale the data plan
wants it at, and libjpeg's reduced-size decoding does not exist for PNG. With a cache, each file
is decoded once: an image is stored uncompressed at full, half and quarter resolution
(antialiased bilinear, the training resize's kernel) and later read at the smallest of those that covers the
plan's scale, as a JPEG is decoded at the smallest DCT scale; a mask is stored whole at full
resolution and memory-mapped, so only the rows a crop needs are read and labels stay exactly
those of the file.

Entries are keyed like the score cache (resolved path, size, mtime, ctime), so a changed file is
decoded again and never served stale. Every entry is written whole (temp file + rename); one that
cannot be read is decoded again. The folder holds at most ``max_gb``: past that nothing new is
stored (loading goes on from the files). JPEG images are never stored, their reduced decode is
already cheap.
"""
from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dance.data.io import file_key, read_image, read_mask
from dance.errors import DanceError
from dance.fileio import atomic_write_bytes

LEVELS = (1, 2, 4)  # an image is stored at 1/1, 1/2 and 1/4 of its size
_FORMAT = "dance-decode-cache-1"  # part of every key: another layout of entries never matches


class DecodeCache:
    """Decoded images and masks under ``folder``, at most ``max_gb`` gigabytes of them."""

    def __init__(self, folder: str | os.PathLike, max_gb: float):
        if max_gb <= 0:
            raise DanceError(f"decode cache size must be positive, got {max_gb:g} GB")
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise DanceError(f"{self.folder}: decode cache exists and is not a folder")
        self.max_bytes = int(max_gb * 2**30)
        self._room: int | None = None  # bytes this process may still add (`_reserve`)
        self.hits = self.misses = 0

    def __getstate__(self) -> dict:  # each DataLoader worker counts its own share of the room
        return {**self.__dict__, "_room": None}

    # ----------------------------------------------------------------------------- reading

    def image(self, path: str | os.PathLike,
              size_for: Callable[[tuple[int, int]], tuple[int, int]]
              ) -> tuple[np.ndarray, tuple[int, int]]:
        """``(H' x W' x 3 uint8 RGB, stored (H, W))``: the smallest stored level that is at least
        ``size_for(stored)`` on both sides (the file decoded and stored on a miss)."""
        stem = self._stem(path)
        full = self._load(stem, "img1", mmap=True)
        if full is None:
            return self._store_image(path, stem, size_for)
        self.hits += 1
        stored = tuple(full.shape[:2])
        level = _covering_level(stored, size_for(stored))
        pixels = None if level == 1 else self._load(stem, f"img{level}", mmap=False)
        return np.array(full if pixels is None else pixels), stored

    def mask(self, path: str | os.PathLike) -> np.ndarray:
        """The mask's raw values, memory-mapped from the cache (decoded and stored on a miss)."""
        stem = self._stem(path)
        raw = self._load(stem, "mask", mmap=True)
        if raw is not None:
            self.hits += 1
            return raw
        self.misses += 1
        raw = read_mask(path)
        self._save(stem, {"mask": raw})
        return raw

    # ----------------------------------------------------------------------------- writing

    def _store_image(self, path, stem: str, size_for) -> tuple[np.ndarray, tuple[int, int]]:
        self.misses += 1
        full = read_image(path)
        stored = tuple(full.shape[:2])
        levels = {1: full, **{level: _downsample(full, level) for level in LEVELS[1:]}}
        self._save(stem, {f"img{level}": a for level, a in levels.items()})
        return levels[_covering_level(stored, size_for(stored))], stored

    def _save(self, stem: str, arrays: dict[str, np.ndarray]) -> None:
        """Write the entries, all or none, if they fit in this process's share of the room.
        The full-size image goes last: it is what marks an image as stored."""
        blobs = {}
        for kind, array in arrays.items():
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
            blobs[kind] = buf.getvalue()
        if not self._reserve(sum(len(b) for b in blobs.values())):
            return
        for kind in sorted(blobs, key=lambda k: k == "img1"):
            try:
                atomic_write_bytes(self._path(stem, kind), blobs[kind])
            except OSError:  # a full or read-only disk: the cache is an optimisation only
                return

    def _reserve(self, n: int) -> bool:
        if self._room is None:
            self._room = self._initial_room()
        if n > self._room:
            return False
        self._room -= n
        return True

    def _initial_room(self) -> int:
        """This process's share of the free room: the room left in the folder, split evenly
        between the DataLoader workers that fill it at the same time."""
        import torch
        used = sum(p.stat().st_size for p in self.folder.rglob("*.npy")) \
            if self.folder.is_dir() else 0
        info = torch.utils.data.get_worker_info()
        return max(0, self.max_bytes - used) // (info.num_workers if info is not None else 1)

    # ----------------------------------------------------------------------------- entries

    def _stem(self, path: str | os.PathLike) -> str:
        try:
            resolved, stamp = file_key(path)
        except FileNotFoundError:
            raise DanceError(f"{path}: file not found") from None
        return hashlib.sha256(f"{_FORMAT}\0{resolved}\0{stamp}".encode()).hexdigest()

    def _path(self, stem: str, kind: str) -> Path:
        return self.folder / stem[:2] / f"{stem}.{kind}.npy"

    def _load(self, stem: str, kind: str, mmap: bool) -> np.ndarray | None:
        path = self._path(stem, kind)
        try:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError):  # missing, or damaged: decoded and written again
            return None


def _level_size(stored: tuple[int, int], level: int) -> tuple[int, int]:
    return max(1, stored[0] // level), max(1, stored[1] // level)


def _covering_level(stored: tuple[int, int], need: tuple[int, int]) -> int:
    """The largest level (smallest stored image) at least ``need`` on both sides."""
    return max(lv for lv in LEVELS if lv == 1 or all(
        have >= want for have, want in zip(_level_size(stored, lv), need)))


def _downsample(image: np.ndarray, level: int) -> np.ndarray:
    """``image`` at 1/``level`` of its size, antialiased bilinear in uint8 (the training
    resize's kernel)."""
    import torch
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F
    t = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a writable copy for torch
    out = F.resize(t, list(_level_size(image.shape[:2], level)), InterpolationMode.BILINEAR,
                   antialias=True)
    return out.permute(1, 2, 0).contiguous().numpy()
