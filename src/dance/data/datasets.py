"""Dataset readers for the layouts of docs/datasets.md.

Every layout is read by one generic reader, parameterised by where its images and masks live, how
a mask is named after its image, and a look-up table (LUT) from raw mask value to train id. The
LUT is the one place in the project that maps label ids to train ids.

Raw value 255 is accepted as ignore in every layout: it is the project's ignore index, and it is
what Cityscapes' license plate id -1 becomes in a uint8 mask.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from dance.data.io import file_key, read_image, read_image_at_least, read_mask
from dance.data.labels import IGNORE_INDEX
from dance.errors import DanceError

if TYPE_CHECKING:
    from dance.data.decode_cache import DecodeCache

DATASETS = ("cityscapes", "cityscapes_categories", "camvid", "bdd100k", "ade20k", "folder", "synth")
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # the `folder` layout's images
JPEG_SUFFIXES = (".jpg", ".jpeg")  # decoded at reduced size by libjpeg, never decode-cached

CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
                  "Car", "Pedestrian", "Bicyclist")

# ADE20K SceneParsing objectInfo150 names, in label order 1..150.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step",
    "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)


@dataclass(frozen=True)
class Sample:
    """One image and its label mask. ``mask`` is None when the mask file is missing."""

    id: str  # relative stem, e.g. "aachen/aachen_000000_000019"
    image: Path
    mask: Path | None


@dataclass(frozen=True)
class _Layout:
    """Where a layout keeps a split, relative to the root (``{split}``: the split's folder)."""

    image_dir: str
    mask_dir: str
    image_suffixes: tuple[str, ...]  # file-name endings that mark an image (case-insensitive)
    mask_suffix: str  # replaces the image suffix to name the mask
    subfolders: bool = False  # images sit one folder deeper (Cityscapes' cities)
    split_folders: dict[str, str] = field(default_factory=dict)  # split -> folder, if they differ


_CITYSCAPES = _Layout("leftImg8bit/{split}", "gtFine/{split}", ("_leftImg8bit.png",),
                      "_gtFine_labelIds.png", subfolders=True)
_LAYOUTS = {
    "cityscapes": _CITYSCAPES,
    "cityscapes_categories": _CITYSCAPES,
    "synth": _CITYSCAPES,
    "camvid": _Layout("{split}", "{split}annot", (".png",), ".png"),
    "bdd100k": _Layout("images/10k/{split}", "labels/sem_seg/masks/{split}", (".jpg",), ".png"),
    "ade20k": _Layout("ADEChallengeData2016/images/{split}",
                      "ADEChallengeData2016/annotations/{split}", (".jpg",), ".png",
                      split_folders={"train": "training", "val": "validation", "test": "testing"}),
    "folder": _Layout("images/{split}", "masks/{split}", IMAGE_SUFFIXES, ".png"),
}


@dataclass
class SegmentationDataset:
    """One split of a dataset: its samples and how raw mask values map to train ids."""

    name: str
    root: Path
    split: str
    class_names: list[str]  # train classes in train-id order
    samples: list[Sample]  # sorted by id
    lut: np.ndarray  # (256,) uint8: raw mask value -> train id (255 = ignore)
    valid_raw: np.ndarray  # (256,) bool: raw values that are in the class table
    image_dir: Path  # the split's image folder (named by errors about the split)
    mask_dir: Path
    ignore_index: int = IGNORE_INDEX
    # masks whose values were checked against the table, by file key (path, size, mtime,
    # ctime): `load` checks an unchanged mask once per process, not on every epoch
    _checked_masks: set = field(default_factory=set, init=False, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def expected_mask(self, sample: Sample) -> Path:
        """Where ``sample``'s mask should be, whether or not it exists."""
        return self.mask_dir / (sample.id + _LAYOUTS[self.name].mask_suffix)

    def split_problem(self) -> str | None:
        """Why the split holds no samples (missing or empty folder), or None if it has samples."""
        if self.samples:
            return None
        if not self.image_dir.is_dir():
            return f"split folder missing: {self.image_dir}"
        return (f"split is empty: no {'/'.join(_LAYOUTS[self.name].image_suffixes)} images "
                f"in {self.image_dir}")

    def map_mask(self, raw: np.ndarray, path: str | os.PathLike | None = None) -> np.ndarray:
        """Raw mask values -> uint8 train ids; DanceError naming the file and any value outside
        the class table."""
        mask_value_counts(raw, self.valid_raw, path)
        return np.take(self.lut, raw)

    def class_pixel_counts(self, value_counts: np.ndarray) -> tuple[np.ndarray, int]:
        """Per-train-class pixel counts and ignore pixels from a (256,) raw-value histogram."""
        per_train_id = np.zeros(256, dtype=np.int64)
        np.add.at(per_train_id, self.lut, value_counts)
        return per_train_id[: self.num_classes], int(per_train_id[self.ignore_index])

    def load(self, i: int, size_for: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
             map_labels: bool = True, cache: DecodeCache | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
        """``(image HxWx3 uint8 RGB, mask HxW uint8 train ids)`` of sample ``i``. With
        ``size_for`` (stored ``(H, W)`` -> the size the pixels are needed at) a JPEG image may
        come decoded smaller (`read_image_at_least`); the mask is always at full size, and with
        ``map_labels=False`` it holds the file's raw values, checked against the class table (a
        caller maps the pixels it keeps with ``lut``). With a `DecodeCache`, masks and
        (with ``size_for``) images other than JPEGs are read from it, decoded once."""
        sample = self.samples[i]
        if sample.mask is None:
            raise DanceError(f"{sample.image}: {missing_mask_problem(self.expected_mask(sample))}")
        if size_for is None:
            image = read_image(sample.image)
            stored = image.shape[:2]
        elif cache is not None and not sample.image.name.lower().endswith(JPEG_SUFFIXES):
            image, stored = cache.image(sample.image, size_for)
        else:
            image, stored = read_image_at_least(sample.image, size_for)
        raw = read_mask(sample.mask) if cache is None else cache.mask(sample.mask)
        if raw.shape != tuple(stored):
            problem = size_mismatch_problem(raw.shape, tuple(stored), sample.image)
            raise DanceError(f"{sample.mask}: {problem}")
        if not map_labels:  # checked whole all the same: a bad value anywhere is an error
            key = file_key(sample.mask)
            if key not in self._checked_masks:
                mask_value_counts(raw, self.valid_raw, sample.mask)
                self._checked_masks.add(key)
            return image, raw
        return image, self.map_mask(raw, sample.mask)


# Problem texts shared by `load` (as DanceError) and `dance check-data` (as report entries).
def missing_mask_problem(expected: Path) -> str:
    return f"mask missing (expected {expected})"


def size_mismatch_problem(mask_hw: tuple[int, ...], image_hw: tuple[int, ...], image: Path) -> str:
    return (f"mask is {mask_hw[0]}x{mask_hw[1]} (HxW) but its image {image} is "
            f"{image_hw[0]}x{image_hw[1]}")


def mask_value_counts(raw: np.ndarray, valid_raw: np.ndarray,
                      path: str | os.PathLike | None = None) -> np.ndarray:
    """(256,) int64 pixel count per raw mask value; DanceError naming the file and every value
    outside the class table ``valid_raw``."""
    where = f"{path}: " if path is not None else ""
    if raw.dtype != np.uint8 and raw.size and (raw.min() < 0 or raw.max() > 255):
        # 16-bit or signed masks: values beyond uint8 cannot be in any table.
        values, pixels = np.unique(raw[(raw < 0) | (raw > 255)], return_counts=True)
        raise DanceError(f"{where}{_bad_values_text(values, int(pixels.sum()))}")
    if raw.dtype == np.uint8 and raw.ndim == 2:  # Pillow's histogram: 2-3x numpy's bincount
        counts = np.asarray(Image.fromarray(raw).histogram(), dtype=np.int64)
    else:
        counts = np.bincount(raw.ravel().astype(np.intp, copy=False), minlength=256)
    bad = (counts > 0) & ~valid_raw
    if bad.any():
        raise DanceError(f"{where}{_bad_values_text(np.flatnonzero(bad), int(counts[bad].sum()))}")
    return counts


def _bad_values_text(values: np.ndarray, pixels: int) -> str:
    shown = ", ".join(str(int(v)) for v in values[:10]) + (", ..." if len(values) > 10 else "")
    return f"mask values outside the class table: {shown} ({pixels} pixels)"


def _lut(pairs: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(lut, valid_raw) from {raw value: train id}; raw 255 is always valid and ignored."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    valid = np.zeros(256, dtype=bool)
    for raw, train_id in pairs.items():
        if 0 <= raw <= 255:  # ids a uint8 mask cannot hold (license plate, -1) never occur
            lut[raw] = train_id
            valid[raw] = True
    valid[IGNORE_INDEX] = True
    return lut, valid


def _cityscapes_table() -> tuple[list[str], dict[int, int]]:
    """Train class names and {label id: train id} from torchvision's copy of the official table."""
    from torchvision.datasets import Cityscapes

    classes = Cityscapes.classes
    trained = sorted(
        (c for c in classes if 0 <= c.train_id < IGNORE_INDEX and not c.ignore_in_eval),
        key=lambda c: c.train_id)
    train_ids = {c.id: c.train_id for c in trained}
    return [c.name for c in trained], {c.id: train_ids.get(c.id, IGNORE_INDEX) for c in classes}


def _cityscapes_categories_table() -> tuple[list[str], dict[int, int]]:
    """Cityscapes' 7 categories (flat, construction, object, nature, sky, human, vehicle), the
    official category-level task: each of the 19 train classes counts as its category, every
    other label id (those the class-level task ignores) stays ignored."""
    from torchvision.datasets import Cityscapes

    _, class_pairs = _cityscapes_table()
    trained = [c for c in Cityscapes.classes if class_pairs.get(c.id, IGNORE_INDEX) != IGNORE_INDEX]
    categories = sorted({(c.category_id, c.category) for c in trained})
    index = {cid: i for i, (cid, _) in enumerate(categories)}
    pairs = {c.id: IGNORE_INDEX for c in Cityscapes.classes}
    pairs.update({c.id: index[c.category_id] for c in trained})
    return [name for _, name in categories], pairs


def _read_class_names(root: Path) -> list[str]:
    """The `folder` layout's classes: ``classes.json`` (a JSON list), else ``classes.txt`` (one a
    line); both present must agree."""
    json_path, txt_path = root / "classes.json", root / "classes.txt"
    names = None
    if json_path.is_file():
        try:
            names = json.loads(json_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DanceError(f"{json_path}: not valid JSON ({e})") from None
        if not (isinstance(names, list) and names
                and all(isinstance(n, str) and n.strip() for n in names)):
            raise DanceError(f"{json_path}: expected a non-empty JSON list of class names")
        names = [n.strip() for n in names]
        path = json_path
    if txt_path.is_file():
        try:
            txt_names = [line.strip() for line in txt_path.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError as e:
            raise DanceError(f"{txt_path}: not UTF-8 text ({e})") from None
        txt_names = [n for n in txt_names if n]
        if not txt_names:
            raise DanceError(f"{txt_path}: no class names (expected one name a line)")
        if names is not None and names != txt_names:
            raise DanceError(f"{txt_path}: disagrees with {json_path}; keep one class file")
        names, path = txt_names, txt_path
    if names is None:
        raise DanceError(f"{json_path}: class file missing (or classes.txt, one name a line)")
    if len(names) > IGNORE_INDEX:
        raise DanceError(f"{path}: {len(names)} classes; at most {IGNORE_INDEX} fit below the "
                         f"ignore value {IGNORE_INDEX}")
    if len(set(names)) != len(names):
        raise DanceError(f"{path}: class names repeat")
    return names


def class_colors(class_names: Sequence[str]) -> np.ndarray:
    """An RGB colour per class (``C x 3`` uint8): the official Cityscapes colours (from
    torchvision's table) for classes named as Cityscapes' are, else well-spread distinct hues
    (golden-ratio steps round the colour wheel), the same for the same class count."""
    import colorsys

    from torchvision.datasets import Cityscapes
    official = {c.name: c.color for c in Cityscapes.classes}
    if all(n in official for n in class_names):
        return np.array([official[n] for n in class_names], dtype=np.uint8)
    hues = [(0.07 + 0.618034 * i) % 1.0 for i in range(len(class_names))]
    rgb = [colorsys.hsv_to_rgb(h, 0.65 if i % 2 else 0.9, 0.95 if i % 3 else 0.75)
           for i, h in enumerate(hues)]
    return (np.array(rgb) * 255).round().astype(np.uint8)


def layout_class_names(name: str) -> list[str] | None:
    """The train classes of a built-in layout, in train-id order; None for ``folder``, whose
    names live in each dataset's classes.json."""
    return None if name not in _LAYOUTS or name == "folder" else _class_table(name, Path("."))[0]


def _class_table(name: str, root: Path) -> tuple[list[str], dict[int, int]]:
    """Train class names and {raw mask value: train id} of a layout."""
    if name in ("cityscapes", "synth"):
        return _cityscapes_table()
    if name == "cityscapes_categories":
        return _cityscapes_categories_table()
    if name == "bdd100k":  # masks already hold Cityscapes train ids
        names, _ = _cityscapes_table()
        return names, {i: i for i in range(len(names))}
    if name == "camvid":
        return list(CAMVID_CLASSES), {**{i: i for i in range(11)}, 11: IGNORE_INDEX}
    if name == "ade20k":
        return list(ADE20K_CLASSES), {0: IGNORE_INDEX, **{i + 1: i for i in range(150)}}
    names = _read_class_names(root)  # folder
    return names, {i: i for i in range(len(names))}


def _list_samples(layout: _Layout, image_dir: Path, mask_dir: Path) -> list[Sample]:
    pattern = "*/*" if layout.subfolders else "*"
    suffixes = tuple(s.lower() for s in layout.image_suffixes)
    samples: dict[str, Sample] = {}
    for image in image_dir.glob(pattern):
        lower = image.name.lower()
        # Dotfiles (e.g. macOS "._x.png" resource forks from an unpacked archive) are not images.
        if image.name.startswith(".") or not lower.endswith(suffixes) or not image.is_file():
            continue
        suffix = next(s for s in suffixes if lower.endswith(s))
        sample_id = image.relative_to(image_dir).as_posix()[: -len(suffix)]
        if sample_id in samples:
            raise DanceError(f"{image}: same name as {samples[sample_id].image}; both would use "
                             f"the mask {mask_dir / (sample_id + layout.mask_suffix)}")
        mask = mask_dir / (sample_id + layout.mask_suffix)
        samples[sample_id] = Sample(sample_id, image, mask if mask.is_file() else None)
    return [samples[k] for k in sorted(samples)]


def open_dataset(name: str, root: str | os.PathLike, split: str, *,
                 allow_empty: bool = False) -> SegmentationDataset:
    """Open one split of a dataset in one of the layouts of docs/datasets.md.

    Raises DanceError for an unknown name or split, a missing root, a missing or malformed class
    file, and (unless ``allow_empty``, which `dance check-data` uses to report it) a missing or
    empty split folder.
    """
    if name not in _LAYOUTS:
        raise DanceError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DanceError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DanceError(f"{root}: dataset root not found")
    layout = _LAYOUTS[name]
    folder = layout.split_folders.get(split, split)
    image_dir = root / layout.image_dir.format(split=folder)
    mask_dir = root / layout.mask_dir.format(split=folder)
    class_names, pairs = _class_table(name, root)
    lut, valid_raw = _lut(pairs)
    samples = _list_samples(layout, image_dir, mask_dir) if image_dir.is_dir() else []
    dataset = SegmentationDataset(name=name, root=root, split=split, class_names=class_names,
                                  samples=samples, lut=lut, valid_raw=valid_raw,
                                  image_dir=image_dir, mask_dir=mask_dir)
    problem = dataset.split_problem()
    if problem and not allow_empty:
        raise DanceError(f"{name} {split}: {problem}")
    return dataset
