"""Dataset readers: tiny fixtures in each real layout, pixel counts checked exactly."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dance.data.datasets import DATASETS, SegmentationDataset, open_dataset
from dance.errors import DanceError

# Cityscapes label ids: 0 unlabeled, 1 ego vehicle, 7 road, 8 sidewalk, 9 parking (not trained),
# 23 sky, 24 person, 26 car, 33 bicycle. Train ids: road 0, sidewalk 1, sky 10, person 11,
# car 13, bicycle 18. (License plate, id -1, cannot be stored in a uint8 mask.)
AACHEN = np.array([[7, 7, 7, 7, 7, 7],
                   [7, 7, 26, 26, 0, 0],
                   [24, 24, 26, 26, 1, 1],
                   [23, 23, 23, 23, 23, 23]], dtype=np.uint8)
BOCHUM = np.array([[8, 8, 8, 8, 9, 9],
                   [8, 8, 8, 8, 9, 9],
                   [33, 33, 8, 8, 8, 8],
                   [8, 8, 8, 8, 8, 255]], dtype=np.uint8)
CITYSCAPES_TRAIN_PIXELS = {0: 8, 1: 17, 10: 6, 11: 2, 13: 4, 18: 2}  # train id -> pixels
CITYSCAPES_IGNORE_PIXELS = 2 + 2 + 4 + 1  # unlabeled, ego vehicle, parking, 255


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_jpg(path: Path, hw: tuple[int, int], seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, quality=90)
    return path


def rgb(hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


def cityscapes_pair(root: Path, split: str, city: str, stem: str, labels: np.ndarray | None,
                    image_hw: tuple[int, int] | None = None) -> tuple[Path, Path]:
    """One Cityscapes image and its labelIds mask, plus the decoys that sit beside real labels."""
    image = write_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                      rgb(image_hw or labels.shape))
    gt = root / "gtFine" / split / city
    mask = gt / f"{stem}_gtFine_labelIds.png"
    if labels is not None:
        write_png(mask, labels)
        write_png(gt / f"{stem}_gtFine_color.png", rgb(labels.shape, seed=1))
        write_png(gt / f"{stem}_gtFine_instanceIds.png",
                  (labels.astype(np.uint16) * 1000 + 1))  # 16-bit, values far beyond 255
        write_png(gt / f"{stem}_gtFine_labelTrainIds.png", np.full(labels.shape, 13, np.uint8))
        (gt / f"{stem}_gtFine_polygons.json").write_text('{"objects": []}')
    return image, mask


def make_cityscapes(root: Path, split: str = "train") -> Path:
    cityscapes_pair(root, split, "aachen", "aachen_000000_000019", AACHEN)
    cityscapes_pair(root, split, "bochum", "bochum_000000_000313", BOCHUM)
    return root


def class_pixels(ds: SegmentationDataset) -> tuple[np.ndarray, int]:
    """Pixels per train class and ignore pixels over the whole split, through `load`."""
    counts = np.zeros(256, dtype=np.int64)
    for i in range(len(ds)):
        image, mask = ds.load(i)
        assert image.dtype == np.uint8 and image.shape == (*mask.shape, 3)
        counts += np.bincount(mask.ravel(), minlength=256)
    return counts[: ds.num_classes], int(counts[255])


def expected(num_classes: int, pixels: dict[int, int]) -> list[int]:
    out = [0] * num_classes
    for k, v in pixels.items():
        out[k] = v
    return out


@pytest.mark.parametrize("name", ["cityscapes", "synth"])
def test_cityscapes_layout_maps_official_label_ids(tmp_path, name):
    ds = open_dataset(name, make_cityscapes(tmp_path), "train")
    assert [s.id for s in ds.samples] == [
        "aachen/aachen_000000_000019", "bochum/bochum_000000_000313"]
    assert ds.samples[0].mask.name == "aachen_000000_000019_gtFine_labelIds.png"  # not a decoy
    assert ds.num_classes == 19 and ds.class_names[0] == "road" and ds.class_names[18] == "bicycle"
    assert ds.lut[[7, 26, 0, 1, 9, 33]].tolist() == [0, 13, 255, 255, 255, 18]
    image, mask = ds.load(0)
    assert image.shape == (4, 6, 3)
    assert mask.tolist() == [[0, 0, 0, 0, 0, 0],
                             [0, 0, 13, 13, 255, 255],
                             [11, 11, 13, 13, 255, 255],
                             [10, 10, 10, 10, 10, 10]]
    pixels, ignore = class_pixels(ds)
    assert pixels.tolist() == expected(19, CITYSCAPES_TRAIN_PIXELS)
    assert ignore == CITYSCAPES_IGNORE_PIXELS


def test_cityscapes_categories_group_the_train_classes(tmp_path):
    """Cityscapes' category-level task: each train class counts as its category; label ids the
    class-level task ignores (unlabeled, ego vehicle, parking) stay ignored."""
    ds = open_dataset("cityscapes_categories", make_cityscapes(tmp_path), "train")
    assert ds.class_names == ["flat", "construction", "object", "nature", "sky", "human",
                              "vehicle"]
    # road 7, sidewalk 8 -> flat; sky 23; person 24; car 26, bicycle 33 -> vehicle
    assert ds.lut[[7, 8, 23, 24, 26, 33, 0, 1, 9, 255]].tolist() == [0, 0, 4, 5, 6, 6, 255, 255,
                                                                   255, 255]
    assert ds.lut[[11, 17, 21]].tolist() == [1, 2, 3]  # building, pole, vegetation
    _, mask = ds.load(0)
    assert mask.tolist() == [[0, 0, 0, 0, 0, 0],
                             [0, 0, 6, 6, 255, 255],
                             [5, 5, 6, 6, 255, 255],
                             [4, 4, 4, 4, 4, 4]]
    pixels, ignore = class_pixels(ds)
    assert pixels.tolist() == [8 + 17, 0, 0, 0, 6, 2, 4 + 2]
    assert ignore == CITYSCAPES_IGNORE_PIXELS


def test_camvid_value_11_is_ignored(tmp_path):
    labels = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [11, 11, 3, 3]], np.uint8)
    write_png(tmp_path / "train" / "0001TP_006690.png", rgb((4, 4)))
    write_png(tmp_path / "trainannot" / "0001TP_006690.png", labels)
    ds = open_dataset("camvid", tmp_path, "train")
    assert ds.class_names[:2] == ["Sky", "Building"] and ds.num_classes == 11
    pixels, ignore = class_pixels(ds)
    assert pixels.tolist() == [1, 1, 1, 3, 1, 1, 1, 1, 1, 1, 1]
    assert ignore == 3


def test_bdd100k_masks_hold_train_ids(tmp_path):
    labels = np.array([[0, 0, 13], [13, 13, 255]], np.uint8)
    write_jpg(tmp_path / "images/10k/val/7d06fefd-f7be05a6.jpg", (2, 3))
    write_png(tmp_path / "labels/sem_seg/masks/val/7d06fefd-f7be05a6.png", labels)
    ds = open_dataset("bdd100k", tmp_path, "val")
    assert ds.samples[0].id == "7d06fefd-f7be05a6" and ds.num_classes == 19
    pixels, ignore = class_pixels(ds)
    assert pixels.tolist() == expected(19, {0: 2, 13: 3})
    assert ignore == 1


def test_ade20k_shifts_labels_and_renames_splits(tmp_path):
    labels = np.array([[0, 1, 1], [150, 150, 150]], np.uint8)
    ade = tmp_path / "ADEChallengeData2016"
    write_jpg(ade / "images/validation/ADE_val_00000001.jpg", (2, 3))
    write_png(ade / "annotations/validation/ADE_val_00000001.png", labels)
    ds = open_dataset("ade20k", tmp_path, "val")
    assert ds.num_classes == 150 and ds.class_names[0] == "wall" and ds.class_names[149] == "flag"
    _, mask = ds.load(0)
    assert mask.tolist() == [[255, 0, 0], [149, 149, 149]]
    pixels, ignore = class_pixels(ds)
    assert pixels.tolist() == expected(150, {0: 2, 149: 3})
    assert ignore == 1
    with pytest.raises(DanceError, match="training"):  # train -> ADE's "training" folder
        open_dataset("ade20k", tmp_path, "train")


def make_folder(root: Path, class_file: str = "classes.json") -> Path:
    names = ["background", "crack", "rust"]
    if class_file == "classes.json":
        (root / "classes.json").parent.mkdir(parents=True, exist_ok=True)
        (root / "classes.json").write_text(json.dumps(names))
    else:
        (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / "classes.txt").write_text("\n".join(names) + "\n\n")
    write_png(root / "images/train/a.png", rgb((2, 2)))
    write_jpg(root / "images/train/b.JPG", (2, 2))
    (root / "images/train/notes.txt").write_text("not an image")
    write_png(root / "masks/train/a.png", np.array([[0, 1], [1, 255]], np.uint8))
    write_png(root / "masks/train/b.png", np.array([[2, 2], [2, 0]], np.uint8))
    return root


@pytest.mark.parametrize("class_file", ["classes.json", "classes.txt"])
def test_folder_layout_reads_class_file(tmp_path, class_file):
    ds = open_dataset("folder", make_folder(tmp_path, class_file), "train")
    assert ds.class_names == ["background", "crack", "rust"]
    assert [s.id for s in ds.samples] == ["a", "b"]
    pixels, ignore = class_pixels(ds)
    assert pixels.tolist() == [2, 2, 3]
    assert ignore == 1
    with pytest.raises(DanceError, match=r"b\.png.*values outside the class table: 3 \(1 pixels\)"):
        ds.map_mask(np.array([[0, 3]], np.uint8), path=ds.samples[1].mask)


@pytest.mark.parametrize("content, message", [
    (None, "classes.json: class file missing"),
    ("[\"a\", ", "classes.json: not valid JSON"),
    ('{"a": 1}', "classes.json: expected a non-empty JSON list"),
    ("[1, 2]", "classes.json: expected a non-empty JSON list"),
])
def test_folder_bad_class_file_is_named(tmp_path, content, message):
    if content is not None:
        (tmp_path / "classes.json").write_text(content)
    with pytest.raises(DanceError, match=message):
        open_dataset("folder", tmp_path, "train")


def test_mask_values_outside_the_table_are_named(tmp_path):
    ds = open_dataset("cityscapes", make_cityscapes(tmp_path), "train")
    raw = AACHEN.copy()
    raw[0, :3] = [34, 34, 200]
    with pytest.raises(DanceError, match=r"x\.png: mask values outside the class table: 34, 200 "
                                         r"\(3 pixels\)"):
        ds.map_mask(raw, path="x.png")
    with pytest.raises(DanceError, match="outside the class table: 300"):  # a 16-bit mask
        ds.map_mask(np.array([[7, 300]], np.int64))
    write_png(ds.samples[0].mask, raw)
    with pytest.raises(DanceError, match="aachen_000000_000019_gtFine_labelIds.png: mask values"):
        ds.load(0)


def test_missing_mask_is_reported_on_load(tmp_path):
    root = make_cityscapes(tmp_path)
    image, mask = cityscapes_pair(root, "train", "aachen", "aachen_000001_000019", labels=None,
                                  image_hw=(4, 6))
    ds = open_dataset("cityscapes", root, "train")
    assert ds.samples[1].id == "aachen/aachen_000001_000019" and ds.samples[1].mask is None
    with pytest.raises(DanceError, match=f"{image}: mask missing \\(expected {mask}\\)"):
        ds.load(1)


def test_size_mismatch_and_truncated_image_fail_on_load(tmp_path):
    root = tmp_path
    cityscapes_pair(root, "train", "aachen", "aachen_000000_000019", AACHEN, image_hw=(5, 6))
    image, _ = cityscapes_pair(root, "train", "bochum", "bochum_000000_000313", BOCHUM)
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    ds = open_dataset("cityscapes", root, "train")
    with pytest.raises(DanceError, match=r"labelIds.png: mask is 4x6 \(HxW\) but its image .* 5x6"):
        ds.load(0)
    with pytest.raises(DanceError, match=f"{image}: unreadable or truncated image"):
        ds.load(1)


def test_open_dataset_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(DanceError, match="unknown dataset 'kitti'"):
        open_dataset("kitti", tmp_path, "train")
    with pytest.raises(DanceError, match="nowhere: dataset root not found"):
        open_dataset("camvid", tmp_path / "nowhere", "train")
    with pytest.raises(DanceError, match="unknown split 'training'"):
        open_dataset("camvid", tmp_path, "training")
    val = tmp_path / "leftImg8bit" / "val"
    with pytest.raises(DanceError, match=f"split folder missing: {val}"):
        open_dataset("cityscapes", tmp_path, "val")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "._0001TP_006690.png").write_bytes(b"macOS resource fork")
    with pytest.raises(DanceError, match=f"split is empty: no .png images in {tmp_path / 'val'}"):
        open_dataset("camvid", tmp_path, "val")
    assert len(open_dataset("camvid", tmp_path, "val", allow_empty=True)) == 0


def test_same_stem_twice_is_ambiguous(tmp_path):
    root = make_folder(tmp_path)
    write_png(root / "images/train/a.jpg", rgb((2, 2)))
    with pytest.raises(DanceError, match="same name as"):
        open_dataset("folder", root, "train")


def test_cli_offers_exactly_the_readers():
    from dance import cli
    assert cli.DATASETS is DATASETS


def test_an_unchanged_mask_is_checked_once_a_changed_one_again(tmp_path, monkeypatch):
    """The loader's path (raw values, mapped later on the crop) checks each mask against the
    class table once per process, keyed by the file: a mask rewritten with a value outside the
    table is still named, on the next load."""
    import dance.data.datasets as datasets
    root = make_cityscapes(tmp_path)
    ds = open_dataset("cityscapes", root, "train")
    checks = []
    real = datasets.mask_value_counts
    monkeypatch.setattr(datasets, "mask_value_counts",
                        lambda *a, **k: checks.append(a[2]) or real(*a, **k))
    for _ in range(3):
        _, raw = ds.load(0, map_labels=False)
    assert raw.tolist() == AACHEN.tolist() and len(checks) == 1
    bad = AACHEN.copy()
    bad[0, 0] = 200  # not a Cityscapes label id
    write_png(ds.samples[0].mask, bad)
    with pytest.raises(DanceError, match=r"aachen_000000_000019_gtFine_labelIds.png: mask values "
                                         r"outside the class table: 200 \(1 pixels\)"):
        ds.load(0, map_labels=False)
