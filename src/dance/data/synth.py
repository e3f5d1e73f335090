"""SynthStreets: procedural street scenes in the Cityscapes layout (docs/datasets.md#synth).

Each scene is a pinhole view down a street: sky, a road with sidewalks and terrain, building or
vegetation facades on both sides, and objects (cars, trucks, buses, people, riders, bicycles,
poles with signs and lights, trees, fences, walls) standing on the ground plane. Every image draws
a complexity level ``c`` in [0, 1], spread evenly over a split: a low ``c`` gives a few large
regions, a high ``c`` dozens of small and thin objects and finer facade texture -- so that, as
on real data, downsampling hurts complex images more (docs/method.md#complexity-indicators).

Drawing is vectorised numpy: each shape is a boolean mask over its bounding box (rectangles,
ellipses, rings, thick segments, trapezoids) and facades are per-column spans computed from the
camera model; no Python loop touches pixels. Each image comes from its own RNG seeded by
``(seed, split, index)`` and PNGs are written with fixed settings, so the same seed gives
byte-identical files whatever the number of worker processes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dance.data.io import png_bytes
from dance.errors import DanceError
from dance.fileio import atomic_write_bytes, atomic_write_json
from dance.parallel import parallel_map

GENERATOR_VERSION = 1
MANIFEST = "synthstreets.json"
SPLITS = ("train", "val", "test")
# Fake city folders, several per split as in Cityscapes; only these folders are ever cleaned.
CITIES = {
    "train": ("synthburg", "pixelheim", "rasterdam"),
    "val": ("valdorf", "checkham"),
    "test": ("testhaven", "holdoutby"),
}
FRAME = 19  # Cityscapes' fine annotations are frame 19 of each sequence
MIN_SIZE = (32, 64)
PNG_COMPRESS_LEVEL = 1  # fixed, so the bytes are reproducible; 1 is several times faster than 6

# Real Cityscapes label ids (the official table; the dataset reader maps them to train ids).
UNLABELED, EGO_VEHICLE = 0, 1
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE = 7, 8, 11, 12, 13, 17
TRAFFIC_LIGHT, TRAFFIC_SIGN, VEGETATION, TERRAIN, SKY = 19, 20, 21, 22, 23
PERSON, RIDER, CAR, TRUCK, BUS, MOTORCYCLE, BICYCLE = 24, 25, 26, 27, 28, 32, 33

# Base colours (RGB) per label id; every instance jitters around them.
_BASE = {
    ROAD: (95, 92, 100), SIDEWALK: (150, 140, 135), BUILDING: (140, 120, 105), WALL: (125, 118, 110),
    FENCE: (110, 95, 75), POLE: (115, 115, 120), TRAFFIC_LIGHT: (40, 45, 40),
    TRAFFIC_SIGN: (200, 60, 50), VEGETATION: (70, 110, 45), TERRAIN: (120, 140, 70),
    SKY: (135, 175, 220), PERSON: (90, 70, 80), RIDER: (150, 60, 50), CAR: (80, 90, 130),
    TRUCK: (170, 165, 150), BUS: (190, 150, 40), MOTORCYCLE: (60, 60, 70), BICYCLE: (70, 50, 40),
    EGO_VEHICLE: (30, 32, 36), UNLABELED: (0, 0, 0),
}
# Texture amplitudes per label id: (low-frequency blotches, per-pixel grain), in grey levels.
_TEXTURE = {
    ROAD: (10, 7), SIDEWALK: (8, 6), BUILDING: (10, 4), WALL: (8, 5), FENCE: (6, 4),
    VEGETATION: (22, 16), TERRAIN: (16, 12), SKY: (6, 0), PERSON: (4, 3), RIDER: (4, 3),
    CAR: (4, 2), TRUCK: (5, 2), BUS: (4, 2), POLE: (3, 2), TRAFFIC_SIGN: (2, 2),
}
_TEX_LO = np.zeros(256, np.float32)
_TEX_HI = np.zeros(256, np.float32)
for _cls, (_lo, _hi) in _TEXTURE.items():
    _TEX_LO[_cls], _TEX_HI[_cls] = _lo, _hi
_GROUND = np.zeros(256, bool)
_GROUND[[ROAD, SIDEWALK, TERRAIN]] = True
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class Style:
    """What sets one scene family apart from another: layout odds, building heights, the object
    mix and the light. Only the ranges of the random draws differ, never their number or order,
    so the default style's files are the same bytes as before styles existed."""

    terrain_p: float = 0.5  # chance of a terrain band beside each sidewalk
    tree_line_p: float = 0.25  # chance a street side is a tree line, not buildings (+0.2 (1-c))
    building_m: tuple[float, float] = (6.0, 30.0)  # facade heights, metres
    big: tuple[str, ...] = ("car", "car", "car", "tree", "tree", "truck", "bus")
    small: tuple[str, ...] = ("car", "car", "car", "person", "person", "person", "pole_sign",
                              "pole_light", "pole_lamp", "pole_sign", "tree", "bicycle", "rider",
                              "motorcycle", "car", "truck")
    contrast: tuple[float, float] = (0.8, 1.15)
    brightness: tuple[float, float] = (-35.0, 30.0)
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)  # colour of the light, per channel
    noise: tuple[float, float] = (1.0, 4.0)  # sensor noise sigma, grey levels


# The scene families `dance synth --style` draws. "streets": the default, city streets by day.
# "suburb-dusk": low houses and tree lines, wide verges, few pedestrians, more bicycles and
# trucks, under dim, warm, low-contrast and noisy dusk light -- a family kept for checking that a
# recipe carries over without retuning (BENCHMARKS.md).
STYLES = {
    "streets": Style(),
    "suburb-dusk": Style(
        terrain_p=0.85, tree_line_p=0.6, building_m=(4.0, 12.0),
        big=("car", "car", "tree", "tree", "tree", "truck", "truck"),
        small=("car", "car", "tree", "tree", "person", "pole_lamp", "pole_lamp", "pole_light",
               "pole_sign", "bicycle", "bicycle", "rider", "motorcycle", "truck", "car", "car"),
        contrast=(0.55, 0.85), brightness=(-75.0, -30.0), tint=(1.12, 0.95, 0.78),
        noise=(3.0, 8.0)),
}


# --------------------------------------------------------------------------- layout and seeding

def sample_stem(split: str, index: int) -> tuple[str, str]:
    """``(city, stem)`` of image ``index`` of ``split``; files are ``{stem}_leftImg8bit.png``."""
    cities = CITIES[split]
    city = cities[index % len(cities)]
    return city, f"{city}_{index // len(cities):06d}_{FRAME:06d}"


def sample_paths(root: str | os.PathLike, split: str, index: int) -> tuple[Path, Path]:
    """Image and label-id mask paths of one sample, in the Cityscapes layout (docs/datasets.md)."""
    city, stem = sample_stem(split, index)
    root = Path(root)
    return (root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
            root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")


def complexity_level(seed: int, split: str, index: int) -> float:
    """The image's complexity level in [0, 1).

    A golden-ratio (Weyl) sequence: any n consecutive images cover [0, 1) almost evenly, with no
    order between index and complexity, and each value needs only its own index.
    """
    offset = np.random.default_rng([seed, SPLITS.index(split), 7919]).random()
    return float((offset + index * _GOLDEN) % 1.0)


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


# --------------------------------------------------------------------------- drawing primitives

class _Canvas:
    """Image (float RGB) and label ids, painted together; shapes are masks over their bbox."""

    def __init__(self, height: int, width: int):
        self.h, self.w = height, width
        self.img = np.zeros((height, width, 3), np.float32)
        self.lab = np.zeros((height, width), np.uint8)

    def _box(self, y0: float, y1: float, x0: float, x1: float):
        """Clipped pixel box plus pixel-centre coordinates, or None when nothing is inside."""
        iy0, iy1 = max(math.floor(y0), 0), min(math.ceil(y1), self.h)
        ix0, ix1 = max(math.floor(x0), 0), min(math.ceil(x1), self.w)
        if iy0 >= iy1 or ix0 >= ix1:
            return None
        yy = np.arange(iy0, iy1, dtype=np.float32)[:, None] + 0.5
        xx = np.arange(ix0, ix1, dtype=np.float32)[None, :] + 0.5
        return (slice(iy0, iy1), slice(ix0, ix1)), yy, xx

    def paint(self, box, mask: np.ndarray, cls: int | None, colour) -> None:
        """Set label ``cls`` (None: colour only) and ``colour`` ((3,) or per-pixel) under mask."""
        sl = box
        if cls is not None:
            self.lab[sl][mask] = cls
        region = self.img[sl]
        colour = np.asarray(colour, np.float32)
        region[mask] = colour if colour.ndim == 1 else colour[mask]

    def darken(self, box, mask: np.ndarray, factor: float) -> None:
        self.img[box][mask] *= factor

    def rect(self, y0, y1, x0, x1, cls, colour) -> None:
        b = self._box(y0, y1, x0, x1)
        if b is not None:
            sl, yy, xx = b
            m = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
            self.paint(sl, m, cls, colour)

    def ellipse(self, cy, cx, ry, rx, cls, colour, inner: float = 0.0, shadow: float = 0.0) -> None:
        """Filled ellipse; ``inner`` > 0 leaves a hole (a ring); ``shadow`` darkens instead."""
        ry, rx = max(ry, 0.5), max(rx, 0.5)
        b = self._box(cy - ry, cy + ry, cx - rx, cx + rx)
        if b is None:
            return
        sl, yy, xx = b
        r2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        m = r2 <= 1.0
        if inner > 0:
            m &= r2 >= inner * inner
        if shadow:
            self.darken(sl, m, shadow)
        else:
            self.paint(sl, m, cls, colour)

    def segment(self, ya, xa, yb, xb, width, cls, colour) -> None:
        """Thick line segment (bicycle frames, arms, lamp arms)."""
        r = max(width / 2.0, 0.5)
        b = self._box(min(ya, yb) - r, max(ya, yb) + r, min(xa, xb) - r, max(xa, xb) + r)
        if b is None:
            return
        sl, yy, xx = b
        dy, dx = yb - ya, xb - xa
        t = np.clip(((yy - ya) * dy + (xx - xa) * dx) / max(dy * dy + dx * dx, 1e-6), 0.0, 1.0)
        m = (yy - ya - t * dy) ** 2 + (xx - xa - t * dx) ** 2 <= r * r
        self.paint(sl, m, cls, colour)

    def trapezoid(self, y0, y1, x0_top, x1_top, x0_bot, x1_bot, cls, colour) -> None:
        """Rows y0..y1; left/right edges interpolate linearly from top to bottom (cabins, signs)."""
        b = self._box(y0, y1, min(x0_top, x0_bot), max(x1_top, x1_bot))
        if b is None:
            return
        sl, yy, xx = b
        t = (yy - y0) / max(y1 - y0, 1e-6)
        m = (yy >= y0) & (yy < y1) & (xx >= x0_top + t * (x0_bot - x0_top)) \
            & (xx < x1_top + t * (x1_bot - x1_top))
        self.paint(sl, m, cls, colour)


def _jitter(rng: np.random.Generator, cls: int, spread: float = 18.0) -> np.ndarray:
    return np.clip(np.asarray(_BASE[cls], np.float32) + rng.normal(0, spread, 3), 0, 255)


def _any_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(20, 235, 3).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Zero-mean, unit-ish value noise with features about ``cell`` pixels wide (bilinear)."""
    small = rng.standard_normal((h // cell + 2, w // cell + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.BILINEAR))


# --------------------------------------------------------------------------- the scene

class _Street:
    """A pinhole camera over a flat street. Ground point (X lateral, z depth) in metres projects to
    ``x = vx + f X / z``, ``y = yh + f cam_h / z``; a height h above it to ``y - f h / z``."""

    def __init__(self, rng: np.random.Generator, c: float, height: int, width: int,
                 style: Style = STYLES["streets"]):
        self.rng, self.c, self.style = rng, c, style
        self.cv = _Canvas(height, width)
        self.h, self.w = height, width
        self.f = width * rng.uniform(0.55, 0.8)
        self.yh = height * rng.uniform(0.36, 0.5)
        self.vx = width * rng.uniform(0.38, 0.62)
        self.cam_h = rng.uniform(1.3, 1.8)
        # Lateral bands (right-hand traffic: the camera sits in a right lane).
        self.road_l, self.road_r = -rng.uniform(3.0, 9.0), rng.uniform(1.6, 4.5)
        self.walk_l, self.walk_r = rng.uniform(1.5, 4.5), rng.uniform(1.5, 4.5)
        self.terr_l = rng.uniform(0, 4) if rng.random() < style.terrain_p else 0.0
        self.terr_r = rng.uniform(0, 4) if rng.random() < style.terrain_p else 0.0
        self.z_near = self.f * self.cam_h / (height - self.yh)  # depth of the bottom row
        self.z_far = rng.uniform(60, 200)

    # --- projection helpers
    def px(self, X: float, z: float) -> float:
        return self.vx + self.f * X / z

    def py(self, h: float, z: float) -> float:
        return self.yh + self.f * (self.cam_h - h) / z

    def scale(self, z: float) -> float:
        return self.f / z

    def random_ground_depth(self, far_bias: float = 0.0) -> float:
        """Depth of a ground point drawn uniformly in image rows (a far bias pushes it back)."""
        t = self.rng.random() ** (1.0 + 2.0 * far_bias)
        y = self.yh + 1.0 + t * (self.h * 1.08 - self.yh - 1.0)
        return self.f * self.cam_h / (y - self.yh)

    # --- background
    def sky(self) -> None:
        rng, cv = self.rng, self.cv
        top = _jitter(rng, SKY, 25) * rng.uniform(0.75, 1.0)
        bottom = np.clip(top + rng.uniform(10, 60), 0, 255)
        rows = math.ceil(self.yh) + 1  # the ground overwrites from row floor(yh) + 1
        t = np.linspace(0.0, 1.0, rows, dtype=np.float32)[:, None, None]
        cv.lab[:rows] = SKY
        cv.img[:rows] = top * (1 - t) + bottom * t
        for _ in range(int(rng.integers(0, 2 + 6 * self.c))):  # clouds: sky texture, same class
            cy, cx = rng.uniform(0, self.yh * 0.7), rng.uniform(0, self.w)
            cv.ellipse(cy, cx, rng.uniform(3, 15), rng.uniform(15, 70), SKY,
                       np.clip(bottom + rng.uniform(20, 60), 0, 255))

    def skyline(self) -> None:
        """Distant blocks at the end of the street, a few pixels tall (only in busier scenes)."""
        rng = self.rng
        if rng.random() > 0.3 + self.c:
            return
        x = self.vx - rng.uniform(0.15, 0.4) * self.w
        x_end = self.vx + rng.uniform(0.15, 0.4) * self.w
        while x < x_end:
            bw = rng.uniform(3, 10 + 30 * (1 - self.c))
            bh = rng.uniform(2, 10 + 25 * (1 - self.c))
            self.cv.rect(self.yh - bh, self.yh + 1, x, x + bw, BUILDING, _jitter(rng, BUILDING, 30))
            x += bw

    def ground(self) -> None:
        """Road, sidewalks and terrain from the lateral position of each ground pixel."""
        rng, cv = self.rng, self.cv
        y0 = math.floor(self.yh) + 1
        yy = np.arange(y0, self.h, dtype=np.float32)[:, None] + 0.5
        xx = np.arange(self.w, dtype=np.float32)[None, :] + 0.5
        z = self.f * self.cam_h / (yy - self.yh)
        X = (xx - self.vx) * z / self.f
        edges = np.array([self.road_l - self.walk_l - self.terr_l, self.road_l - self.walk_l,
                          self.road_l, self.road_r, self.road_r + self.walk_r,
                          self.road_r + self.walk_r + self.terr_r], np.float32)
        band_cls = np.array([TERRAIN, TERRAIN, SIDEWALK, ROAD, SIDEWALK, TERRAIN, TERRAIN], np.uint8)
        band_col = np.stack([_jitter(rng, int(k), 14) for k in band_cls])
        band = np.searchsorted(edges, X)
        cv.lab[y0:] = band_cls[band]
        cv.img[y0:] = band_col[band]
        # Lane markings and curbs are colour only (Cityscapes labels them road / sidewalk).
        if rng.random() < 0.2 + self.c:
            paint = np.array([220, 220, 210], np.float32) * rng.uniform(0.7, 1.0)
            lanes = [0.0] + ([self.road_l / 2] if self.road_l < -5 and self.c > 0.4 else [])
            dash = rng.uniform(2.0, 6.0)
            for lane in lanes:
                m = (np.abs(X - lane) < 0.08) & ((z / dash) % 2.0 < 1.0)
                cv.img[y0:][m] = paint
            for edge in (self.road_l, self.road_r):
                cv.img[y0:][np.abs(X - edge) < 0.12] *= 1.25
        # A crosswalk: stripes across the road at one depth.
        if rng.random() < self.c * 0.6:
            zc = rng.uniform(self.z_near * 1.2, 30)
            m = (np.abs(z - zc) < 1.5) & (X > self.road_l) & (X < self.road_r) & ((X % 1.0) < 0.5)
            cv.img[y0:][m] = np.array([215, 215, 205], np.float32)

    def shadows(self) -> None:
        """Cast shadows of the facades over part of the ground (image only, like real light)."""
        rng, cv = self.rng, self.cv
        if rng.random() < 0.4:
            return
        y0 = math.floor(self.yh) + 1
        yy = np.arange(y0, self.h, dtype=np.float32)[:, None] + 0.5
        xx = np.arange(self.w, dtype=np.float32)[None, :] + 0.5
        z = self.f * self.cam_h / (yy - self.yh)
        X = (xx - self.vx) * z / self.f
        side = rng.choice([-1.0, 1.0])
        # The shadow reaches past the road edge of its side; a slanted sun makes it vary with z.
        road_edge = self.road_r if side > 0 else -self.road_l
        reach = rng.uniform(1.0, 10.0) + rng.uniform(-0.08, 0.08) * z
        m = (side * X > road_edge - reach) & _GROUND[cv.lab[y0:]]
        cv.img[y0:][m] *= rng.uniform(0.5, 0.8)

    def facade(self, side: int, X: float, z0: float, z1: float, heights: np.ndarray,
               bounds: np.ndarray):
        """Per-column span of a vertical surface parallel to the street at lateral ``X``.

        Returns (box, mask, h, z_col, seg) for the columns whose depth is in [z0, z1]: ``h`` is
        the height in metres of each pixel on the surface, ``seg`` the segment index per column
        (``bounds`` are the segments' depth limits, ``heights`` their heights in metres).
        """
        d = np.arange(self.w, dtype=np.float32) + 0.5 - self.vx
        z_all = np.where(side * d > 0.5, self.f * abs(X) / np.maximum(np.abs(d), 1e-3), np.inf)
        cols = np.nonzero((z_all >= z0) & (z_all <= z1))[0]
        if cols.size == 0:
            return None
        xs = slice(int(cols[0]), int(cols[-1]) + 1)
        z_col = z_all[xs]
        seg = np.clip(np.searchsorted(bounds, z_col) - 1, 0, len(heights) - 1)
        y_top = self.yh + self.f * (self.cam_h - heights[seg]) / z_col
        y_bot = self.yh + self.f * self.cam_h / z_col
        iy0 = max(math.floor(y_top.min()), 0)
        iy1 = min(math.ceil(y_bot.max()), self.h)
        if iy0 >= iy1:
            return None
        yy = np.arange(iy0, iy1, dtype=np.float32)[:, None] + 0.5
        m = (yy >= y_top[None, :]) & (yy < y_bot[None, :])
        h = self.cam_h - (yy - self.yh) * z_col[None, :] / self.f
        return (slice(iy0, iy1), xs), m, h, z_col, seg

    def side(self, side: int) -> None:
        """Buildings (with windows) or a tree line along one side of the street."""
        rng, c = self.rng, self.c
        X = (self.road_r + self.walk_r + self.terr_r) if side > 0 else \
            (self.road_l - self.walk_l - self.terr_l)
        n_seg = 1 + int(rng.integers(0, 2 + 10 * c))
        bounds = np.concatenate([[0.0], np.sort(rng.uniform(self.z_near, self.z_far, n_seg - 1)),
                                 [self.z_far]])
        if rng.random() < self.style.tree_line_p + 0.2 * (1 - c):  # tree line: bumpy top
            heights = rng.uniform(3, 12, n_seg)
            geo = self.facade(side, X, 0.0, self.z_far, heights, bounds)
            if geo is None:
                return
            box, m, h, z_col, seg = geo
            bump = 1.2 * np.sin(z_col * rng.uniform(0.3, 1.5) + rng.uniform(0, 6.3))
            m &= h < (heights[seg] + bump - 1.2)[None, :]
            colours = np.stack([_jitter(rng, VEGETATION, 20) for _ in range(n_seg)])
            self.cv.paint(box, m, VEGETATION, np.broadcast_to(colours[seg][None], m.shape + (3,)))
            return
        heights = rng.uniform(*self.style.building_m, n_seg)
        geo = self.facade(side, X, 0.0, self.z_far, heights, bounds)
        if geo is None:
            return
        box, m, h, z_col, seg = geo
        colours = np.stack([_jitter(rng, BUILDING, 35) for _ in range(n_seg)])
        colour = np.broadcast_to(colours[seg][None], m.shape + (3,)).copy()
        # Windows: floors and bays on a metric grid, so they shrink with depth (perspective);
        # their size falls with complexity, their contrast varies per building (colour only).
        if rng.random() < 1.2 * c:
            floor_m = rng.uniform(3.0, 4.0) - 0.8 * c
            bay_m = rng.uniform(2.0, 4.5) - 1.0 * c
            win = ((h / floor_m) % 1.0 > 0.35) & ((z_col[None, :] / bay_m) % 1.0 > 0.4)
            win &= (h > floor_m) & (h < heights[seg][None, :] - 0.6)
            glass = np.stack([_any_colour(rng) * 0.3 + 40 for _ in range(n_seg)])
            colour[win] = glass[seg][np.nonzero(win)[1]]
        # Ground-floor shop fronts (a darker band).
        shop = (h < rng.uniform(2.5, 4.0)) & (rng.random() < 0.5)
        colour[shop] *= 0.7
        self.cv.paint(box, m, BUILDING, colour)

    def barrier(self, side: int) -> None:
        """A fence (thin slats and rails) or a wall at the outer edge of a sidewalk."""
        rng = self.rng
        X = (self.road_r + self.walk_r) if side > 0 else (self.road_l - self.walk_l)
        z0 = rng.uniform(self.z_near, 40)
        z1 = z0 + rng.uniform(5, 40)
        top = np.array([rng.uniform(0.8, 2.0)])
        geo = self.facade(side, X, z0, z1, top, np.array([z0, z1]))
        if geo is None:
            return
        box, m, h, z_col, _ = geo
        if rng.random() < 0.6:
            pitch = rng.uniform(0.12, 0.4)
            slat = ((z_col[None, :] / pitch) % 1.0) < rng.uniform(0.25, 0.5)
            rail = np.abs(h - top[0] * 0.85) < 0.05
            m &= slat | rail | (np.abs(h - top[0] * 0.3) < 0.05)
            self.cv.paint(box, m, FENCE, _jitter(rng, FENCE, 25))
        else:
            self.cv.paint(box, m, WALL, _jitter(rng, WALL, 25))

    # --- objects standing on the ground (billboards facing the camera)
    def _rect_m(self, X, z, xl, xr, h0, h1, cls, colour) -> None:
        s = self.scale(z)
        self.cv.rect(self.py(h1, z), self.py(h0, z), self.px(X, z) + xl * s, self.px(X, z) + xr * s,
                     cls, colour)

    def car(self, X: float, z: float, kind: int = CAR) -> None:
        rng, cv, s = self.rng, self.cv, self.scale(z)
        w = rng.uniform(1.6, 2.0) if kind == CAR else rng.uniform(2.3, 2.6)
        hgt = rng.uniform(1.35, 1.7) if kind == CAR else rng.uniform(2.8, 3.8)
        col = _jitter(rng, kind, 25) if rng.random() < 0.5 else _any_colour(rng)
        cx, yg = self.px(X, z), self.py(0, z)
        cv.ellipse(yg, cx, 0.25 * s, 0.65 * w * s, None, None, shadow=0.55)
        tyre = np.array([25, 25, 28], np.float32)
        for sgn in (-1, 1):
            self._rect_m(X, z, min(sgn * w / 2, sgn * (w / 2 - 0.3)),
                         max(sgn * w / 2, sgn * (w / 2 - 0.3)), 0, 0.4, kind, tyre)
        if kind == CAR:
            self._rect_m(X, z, -w / 2, w / 2, 0.25, 0.55 * hgt + 0.2, kind, col)
            cv.trapezoid(self.py(hgt, z), self.py(0.55 * hgt + 0.2, z), cx - 0.33 * w * s,
                         cx + 0.33 * w * s, cx - 0.46 * w * s, cx + 0.46 * w * s, kind, col)
            cv.trapezoid(self.py(hgt - 0.07, z), self.py(0.55 * hgt + 0.27, z), cx - 0.28 * w * s,
                         cx + 0.28 * w * s, cx - 0.4 * w * s, cx + 0.4 * w * s, None,
                         col * 0.25 + 20)
        else:
            self._rect_m(X, z, -w / 2, w / 2, 0.3, hgt, kind, col)
            if kind == BUS:  # a window band
                self._rect_m(X, z, -w / 2 + 0.1, w / 2 - 0.1, 0.55 * hgt, 0.85 * hgt, None,
                             col * 0.2 + 25)
            else:  # a truck's cab peeks over the box
                self._rect_m(X, z, -w / 2 + 0.3, w / 2 - 0.3, hgt, hgt + 0.25, kind, col * 0.8)
        for sgn in (-1, 1):  # rear lights, colour only
            self._rect_m(X, z, sgn * w * 0.42 - 0.1, sgn * w * 0.42 + 0.1, 0.6, 0.75, None,
                         np.array([200, 30, 30], np.float32))

    def person(self, X: float, z: float, cls: int = PERSON, seated: float = 0.0) -> None:
        rng, cv, s = self.rng, self.cv, self.scale(z)
        hp = rng.uniform(1.5, 1.9)
        cx = self.px(X, z)
        base = seated
        legs, shirt = _any_colour(rng) * 0.6, _any_colour(rng)
        skin = np.array([205, 160, 130], np.float32) * rng.uniform(0.5, 1.1)
        if cls == RIDER:
            shirt = shirt * 0.5 + np.array([120, 30, 20], np.float32)
        if not seated:
            stride = rng.uniform(0.0, 0.2)
            for sgn in (-1, 1):
                cv.segment(self.py(0.47 * hp, z), cx + sgn * 0.08 * s, self.py(0, z),
                           cx + sgn * (0.08 + stride) * s, 0.14 * s, cls, legs)
        else:
            cv.segment(self.py(base, z), cx, self.py(base - 0.55, z), cx + 0.25 * s, 0.14 * s, cls, legs)
        top = base + (0.82 - 0.47) * hp if seated else 0.82 * hp
        bottom = base if seated else 0.45 * hp
        self._rect_m(X, z, -0.2, 0.2, bottom, top, cls, shirt)
        for sgn in (-1, 1):
            cv.segment(self.py(top - 0.05, z), cx + sgn * 0.2 * s, self.py(top - 0.6, z),
                       cx + sgn * 0.26 * s, 0.09 * s, cls, shirt * 0.9)
        head = top + 0.13
        cv.ellipse(self.py(head, z), cx, 0.12 * s, 0.1 * s, cls, skin)

    def bicycle(self, X: float, z: float, ridden: bool, motor: bool = False) -> None:
        rng, cv, s = self.rng, self.cv, self.scale(z)
        kind = MOTORCYCLE if motor else BICYCLE
        col = _jitter(rng, kind, 40)
        cx, r = self.px(X, z), (0.32 if motor else 0.34)
        yc = self.py(r, z)
        for sgn in (-1, 1):
            cv.ellipse(yc, cx + sgn * 0.55 * s, r * s, r * s, kind, col * 0.4,
                       inner=0.5 if motor else 0.8)
        t = (0.1 if motor else 0.045) * s
        seat, bar = (cx - 0.1 * s, self.py(0.85, z)), (cx + 0.4 * s, self.py(1.0, z))
        cv.segment(yc, cx - 0.55 * s, seat[1], seat[0], t, kind, col)
        cv.segment(yc, cx - 0.55 * s, yc, cx, t, kind, col)
        cv.segment(yc, cx, seat[1], seat[0], t, kind, col)
        cv.segment(yc, cx, bar[1], bar[0], t, kind, col)
        cv.segment(bar[1], bar[0], yc, cx + 0.55 * s, t, kind, col)
        if motor:
            cv.ellipse(self.py(0.6, z), cx, 0.22 * s, 0.5 * s, kind, col)
        if ridden:
            self.person(X - 0.1, z, RIDER, seated=0.85)

    def pole(self, X: float, z: float, attach: str) -> None:
        rng, cv, s = self.rng, self.cv, self.scale(z)
        hp = rng.uniform(3.0, 8.0)
        w = rng.uniform(0.1, 0.22)
        col = _jitter(rng, POLE, 20)
        self._rect_m(X, z, -w / 2, w / 2, 0, hp, POLE, col)
        cx = self.px(X, z)
        if attach == "sign":
            hs, size = rng.uniform(2.0, min(hp, 3.5)), rng.uniform(0.5, 0.9)
            sc = _any_colour(rng) if rng.random() < 0.5 else _jitter(rng, TRAFFIC_SIGN, 30)
            shape = rng.integers(0, 3)
            ys, half = self.py(hs, z), size / 2 * s
            if shape == 0:
                cv.ellipse(ys, cx, half, half, TRAFFIC_SIGN, sc)
                cv.ellipse(ys, cx, half, half, TRAFFIC_SIGN, sc * 0.3 + 160, inner=0.75)
            elif shape == 1:
                cv.rect(ys - half, ys + half, cx - half, cx + half, TRAFFIC_SIGN, sc)
            else:
                cv.trapezoid(ys - half, ys + half, cx, cx + 1, cx - half, cx + half, TRAFFIC_SIGN, sc)
        elif attach == "light":
            hl = min(hp, rng.uniform(2.5, 5.0))
            self._rect_m(X, z, -0.18, 0.18, hl - 0.9, hl, TRAFFIC_LIGHT, _jitter(rng, TRAFFIC_LIGHT, 10))
            lit = rng.integers(0, 3)
            lamps = np.array([[230, 40, 30], [240, 180, 30], [40, 220, 90]], np.float32)
            for i in range(3):
                cv.ellipse(self.py(hl - 0.17 - 0.28 * i, z), cx, 0.1 * s, 0.1 * s, None,
                           lamps[i] if i == lit else lamps[i] * 0.25)
        elif attach == "lamp":
            sgn = -1.0 if X > 0 else 1.0
            cv.segment(self.py(hp, z), cx, self.py(hp + 0.3, z), cx + sgn * 1.5 * s, w * s, POLE, col)
            cv.ellipse(self.py(hp + 0.25, z), cx + sgn * 1.5 * s, 0.12 * s, 0.35 * s, POLE,
                       np.array([235, 235, 200], np.float32))

    def tree(self, X: float, z: float) -> None:
        rng, cv, s = self.rng, self.cv, self.scale(z)
        trunk = rng.uniform(1.5, 3.0)
        self._rect_m(X, z, -0.15, 0.15, 0, trunk + 0.5, VEGETATION, np.array([80, 60, 45], np.float32))
        cx = self.px(X, z)
        crown = rng.uniform(1.2, 2.5)
        for _ in range(int(rng.integers(3, 7))):
            dx, dh = rng.normal(0, 0.6 * crown), trunk + crown + rng.normal(0, 0.5 * crown)
            r = crown * rng.uniform(0.5, 0.9)
            cv.ellipse(self.py(dh, z), cx + dx * s, r * s, r * s * rng.uniform(0.8, 1.2), VEGETATION,
                       _jitter(rng, VEGETATION, 22))

    def objects(self) -> None:
        """Dozens of small objects at high complexity, a couple of large ones at low, far first."""
        rng, c = self.rng, self.c
        n = round(c ** 1.5 * rng.uniform(35, 60) + rng.uniform(0, 1.5))
        big, small = list(self.style.big), list(self.style.small)
        items = []
        for _ in range(n):
            kind = str(rng.choice(big if rng.random() > c + 0.2 else small))
            z = self.random_ground_depth(far_bias=c)
            if kind in ("truck", "bus"):  # not so near that one vehicle fills the frame
                z = max(z, 3.0 * self.z_near)
            on_road = kind in ("car", "truck", "bus", "rider", "motorcycle") or \
                (kind == "person" and rng.random() < 0.15)
            if on_road:
                X = rng.uniform(self.road_l + 1.0, self.road_r - 1.0) if self.road_r - self.road_l > 2 \
                    else 0.5 * (self.road_l + self.road_r)
            else:
                sgn = rng.choice([-1, 1])
                walk, edge = (self.walk_r, self.road_r) if sgn > 0 else (self.walk_l, self.road_l)
                offset = rng.uniform(0.3, max(walk - 0.3, 0.4)) if kind != "pole_sign" else 0.3
                X = edge + sgn * offset
            items.append((z, X, kind))
        for z, X, kind in sorted(items, key=lambda t: -t[0]):  # painter's order: far to near
            if kind in ("car", "truck", "bus"):
                self.car(X, z, {"car": CAR, "truck": TRUCK, "bus": BUS}[kind])
            elif kind == "person":
                self.person(X, z)
            elif kind in ("bicycle", "rider", "motorcycle"):
                self.bicycle(X, z, ridden=kind != "bicycle", motor=kind == "motorcycle")
            elif kind == "tree":
                self.tree(X, z)
            else:
                self.pole(X, z, kind.split("_")[1])

    def ego_vehicle(self) -> None:
        """The camera car's bonnet at the bottom (Cityscapes 'ego vehicle', ignored in training)."""
        if self.rng.random() < 0.3:
            ry = self.h * self.rng.uniform(0.05, 0.12)
            self.cv.ellipse(self.h + ry * 0.2, self.w / 2, ry, self.w * 0.75, EGO_VEHICLE,
                            _jitter(self.rng, EGO_VEHICLE, 8))

    def finish(self) -> np.ndarray:
        """Textures per class, then global lighting, colour cast and sensor noise."""
        rng, cv = self.rng, self.cv
        lo = _smooth_noise(rng, self.h, self.w, cell=max(4, self.w // 48))
        grain = rng.standard_normal((self.h, self.w)).astype(np.float32)
        # Texture is part of spatial detail: finer and stronger in complex scenes.
        detail = 0.3 + 0.9 * self.c
        img = cv.img + (detail * (_TEX_LO[cv.lab] * lo + _TEX_HI[cv.lab] * grain))[..., None]
        st = self.style
        contrast, brightness = rng.uniform(*st.contrast), rng.uniform(*st.brightness)
        cast = (rng.uniform(0.85, 1.15, 3) * np.asarray(st.tint)).astype(np.float32)
        img = ((img - 110.0) * contrast + 110.0 + brightness) * cast
        img += rng.normal(0, rng.uniform(*st.noise), img.shape).astype(np.float32)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_scene(rng: np.random.Generator, complexity: float, size: tuple[int, int],
                 style: str = "streets") -> tuple[np.ndarray, np.ndarray]:
    """One SynthStreets scene: (image H x W x 3 uint8 RGB, label ids H x W uint8)."""
    st = _Street(rng, complexity, *size, style=STYLES[style])
    st.sky()
    st.skyline()
    st.ground()
    st.shadows()
    for side in (-1, 1):
        st.side(side)
    for side in (-1, 1):
        if rng.random() < 0.7 * complexity:
            st.barrier(side)
    st.objects()
    st.ego_vehicle()
    return st.finish(), st.cv.lab


def _png_bytes(array: np.ndarray) -> bytes:
    return png_bytes(array, compress_level=PNG_COMPRESS_LEVEL)


def render_sample(seed: int, split: str, index: int, size: tuple[int, int],
                  style: str = "streets") -> tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of ``split`` exactly as ``generate_synthstreets`` writes it, in memory:
    (image H x W x 3 uint8 RGB, Cityscapes label ids H x W uint8)."""
    return render_scene(_image_rng(seed, split, index), complexity_level(seed, split, index), size,
                        style)


def _write_sample(job: tuple[str, int, str, int, tuple[int, int], str]) -> None:
    root, seed, split, index, size, style = job
    image, labels = render_sample(seed, split, index, size, style)
    image_path, mask_path = sample_paths(root, split, index)
    atomic_write_bytes(image_path, _png_bytes(image))
    atomic_write_bytes(mask_path, _png_bytes(labels))


# --------------------------------------------------------------------------- dataset generation

def _parameters(counts: dict[str, int], size: tuple[int, int], seed: int, style: str) -> dict:
    params = {"generator": "synthstreets", "version": GENERATOR_VERSION, "seed": int(seed),
              "size": [int(size[0]), int(size[1])], "splits": {s: int(counts[s]) for s in SPLITS}}
    if style != "streets":  # the default's manifest stays as it was
        params["style"] = style
    return params


def _is_complete(root: Path, params: dict) -> bool:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or {k: manifest.get(k) for k in params} != params \
            or manifest.get("style", "streets") != params.get("style", "streets"):
        return False
    return all(p.is_file() for s, n in params["splits"].items() for i in range(n)
               for p in sample_paths(root, s, i))


def _remove_stale(root: Path, counts: dict[str, int]) -> None:
    """Delete SynthStreets files of an earlier, larger generation (only in our own city folders),
    so a dataset reader never sees a mix of two generations."""
    for split in SPLITS:
        keep = {p for i in range(counts[split]) for p in sample_paths(root, split, i)}
        for city in CITIES[split]:
            for folder, suffix in (("leftImg8bit", "_leftImg8bit.png"),
                                   ("gtFine", "_gtFine_labelIds.png")):
                d = root / folder / split / city
                if not d.is_dir():
                    continue
                for p in d.glob(f"{city}_*{suffix}"):
                    if p not in keep:
                        p.unlink()
                if not any(d.iterdir()):
                    d.rmdir()


def generate_synthstreets(out: str | os.PathLike, train: int = 300, val: int = 100, test: int = 0,
                          size: tuple[int, int] = (256, 512), seed: int = 0,
                          workers: int | None = None, progress: bool = True,
                          style: str = "streets") -> dict:
    """Write SynthStreets into ``out`` in the Cityscapes layout (docs/datasets.md) and return a summary.

    Deterministic: the same parameters give byte-identical files for any ``workers``. When
    ``out`` already holds a complete set for the same parameters (its ``synthstreets.json``
    manifest, written last, matches and every file exists) nothing is regenerated.
    Summary keys: ``out``, ``train``, ``val``, ``test``, ``size``, ``seed``, ``images``,
    ``seconds``, ``reused``, ``style``. ``style`` names the scene family (``STYLES``).
    """
    if style not in STYLES:
        raise DanceError(f"--style {style!r} is not a SynthStreets style; choose from "
                         f"{', '.join(STYLES)}")
    counts = {"train": train, "val": val, "test": test}
    for name, n in counts.items():
        if int(n) != n or n < 0:
            raise DanceError(f"--{name} must be a non-negative integer, got {n!r}")
    counts = {k: int(v) for k, v in counts.items()}
    total = sum(counts.values())
    if total == 0:
        raise DanceError("nothing to generate (train, val and test are all 0)")
    h, w = (int(v) for v in size)
    if h < MIN_SIZE[0] or w < MIN_SIZE[1]:
        raise DanceError(f"--size {h}x{w} is too small; at least "
                         f"{MIN_SIZE[0]}x{MIN_SIZE[1]}")
    if workers is not None and workers < 0:
        raise DanceError(f"--workers must be >= 0, got {workers}")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise DanceError(f"{root}: exists and is not a folder")
    params = _parameters(counts, (h, w), seed, style)
    summary = {"out": str(root), **counts, "size": [h, w], "seed": int(seed), "images": total,
               "style": style}
    if _is_complete(root, params):
        return {**summary, "seconds": 0.0, "reused": True}

    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)  # an interrupted run must not look complete
    _remove_stale(root, counts)
    jobs = [(str(root), int(seed), s, i, (h, w), style) for s in SPLITS
            for i in range(counts[s])]
    # workers=0 draws in this process; None uses every core we may run on.
    for _ in parallel_map(_write_sample, jobs, workers, progress=progress, desc="SynthStreets",
                          what="generating SynthStreets"):
        pass
    seconds = time.perf_counter() - start
    atomic_write_json(root / MANIFEST, params)  # no timings in it: the folder is byte-identical
    return {**summary, "seconds": seconds, "reused": False}


def cli_synth(args: argparse.Namespace) -> int:
    """``dance synth``: generate SynthStreets and print one line saying what was written."""
    s = generate_synthstreets(args.out, train=args.train, val=args.val, test=args.test,
                              size=tuple(args.size), seed=args.seed, workers=args.workers,
                              style=args.style)
    what = "already complete, reused" if s["reused"] else f"generated in {s['seconds']:.1f} s"
    print(f"SynthStreets {s['style']} {s['size'][0]}x{s['size'][1]} seed {s['seed']}: "
          f"{s['train']} train, "
          f"{s['val']} val, {s['test']} test images in {s['out']} ({what})")
    return 0
