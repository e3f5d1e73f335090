"""`dance check-data`: every kind of bad input is found, named, and exits 1."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dance.cli import main
from dance.data.check import check_dataset
from dance.data.datasets import open_dataset
from test_datasets import (
    AACHEN,
    BOCHUM,
    CITYSCAPES_IGNORE_PIXELS,
    CITYSCAPES_TRAIN_PIXELS,
    cityscapes_pair,
    expected,
    make_cityscapes,
    write_jpg,
    write_png,
)

FIELDS = {"dataset", "split", "num_samples", "num_classes", "class_pixels", "ignore_pixels",
          "problems"}


def check_json(capsys, *args: str) -> tuple[int, dict]:
    rc = main(["check-data", *args, "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out)  # exactly one JSON object on stdout


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_clean_dataset_exits_0_with_exact_pixel_counts(tmp_path, capsys):
    make_cityscapes(tmp_path)
    rc, report = check_json(capsys, "--dataset", "cityscapes", "--root", str(tmp_path))
    assert rc == 0
    assert FIELDS <= report.keys()
    assert report["dataset"] == "cityscapes" and report["split"] == "train"
    assert report["num_samples"] == 2 and report["num_classes"] == 19
    assert report["class_pixels"] == expected(19, CITYSCAPES_TRAIN_PIXELS)
    assert report["ignore_pixels"] == CITYSCAPES_IGNORE_PIXELS
    assert report["problems"] == []


def make_broken_cityscapes(root):
    """One good sample and one sample per kind of problem."""
    cityscapes_pair(root, "train", "aachen", "aachen_000000_000019", AACHEN)  # the good one
    missing = cityscapes_pair(root, "train", "aachen", "aachen_000001_000019", None,
                              image_hw=(4, 6))
    mismatch = cityscapes_pair(root, "train", "aachen", "aachen_000002_000019", AACHEN,
                               image_hw=(8, 12))
    bad_image = cityscapes_pair(root, "train", "bochum", "bochum_000000_000313", BOCHUM)
    truncate(bad_image[0])
    bad_mask = cityscapes_pair(root, "train", "bochum", "bochum_000001_000313", BOCHUM)
    truncate(bad_mask[1])
    raw = BOCHUM.copy()
    raw[0, :2] = [34, 34]
    bad_values = cityscapes_pair(root, "train", "bochum", "bochum_000002_000313", raw)
    return missing, mismatch, bad_image, bad_mask, bad_values


def test_every_problem_is_listed_with_its_file(tmp_path, capsys):
    missing, mismatch, bad_image, bad_mask, bad_values = make_broken_cityscapes(tmp_path)
    rc, report = check_json(capsys, "--dataset", "cityscapes", "--root", str(tmp_path))
    assert rc == 1
    assert report["num_samples"] == 6
    problems = {(p["file"], p["problem"].split(" (")[0].split(":")[0]) for p in report["problems"]}
    assert problems == {
        (str(missing[0]), "mask missing"),
        (str(mismatch[1]), "mask is 4x6"),
        (str(bad_image[0]), "truncated PNG"),  # no complete end chunk: found before decoding
        (str(bad_mask[1]), "truncated PNG"),
        (str(bad_values[1]), "mask values outside the class table"),
    }
    by_file = {p["file"]: p["problem"] for p in report["problems"]}
    assert by_file[str(bad_values[1])] == "mask values outside the class table: 34 (2 pixels)"
    assert by_file[str(mismatch[1])].endswith(f"its image {mismatch[0]} is 8x12")
    # Only the problem-free sample is counted (aachen_000000_000019).
    road, car, person, sky = 8, 4, 2, 6
    assert report["class_pixels"] == expected(19, {0: road, 13: car, 11: person, 10: sky})
    assert report["ignore_pixels"] == 4


def test_truncated_jpeg_is_found_and_trailing_bytes_are_not(tmp_path):
    masks = tmp_path / "labels/sem_seg/masks/train"
    images = tmp_path / "images/10k/train"
    for stem in ("0a0a0b1a-7c39d841", "0a1b2c3d-00000001", "0a1b2c3d-00000002"):
        write_jpg(images / f"{stem}.jpg", (32, 48))
        write_png(masks / f"{stem}.png", np.zeros((32, 48), np.uint8))
    truncate(images / "0a1b2c3d-00000001.jpg", keep=0.8)
    with open(images / "0a1b2c3d-00000002.jpg", "ab") as f:  # padding after end-of-image: valid
        f.write(b"\x00" * 100)
    report = check_dataset(open_dataset("bdd100k", tmp_path, "train"), workers=1, progress=False)
    assert report.problems == [{"file": str(images / "0a1b2c3d-00000001.jpg"),
                                "problem": "truncated JPEG (no end-of-image marker)"}]
    assert report.class_pixels[0] == 2 * 32 * 48


@pytest.mark.parametrize("split, problem", [
    ("val", "split folder missing"),
    ("test", "split is empty"),
])
def test_missing_or_empty_split_exits_1(tmp_path, capsys, split, problem):
    make_cityscapes(tmp_path)
    (tmp_path / "leftImg8bit" / "test" / "berlin").mkdir(parents=True)
    rc, report = check_json(capsys, "--dataset", "cityscapes", "--root", str(tmp_path),
                            "--split", split)
    assert rc == 1
    assert report["num_samples"] == 0 and report["class_pixels"] == [0] * 19
    folder = str(tmp_path / "leftImg8bit" / split)
    [entry] = report["problems"]
    assert entry["file"] == folder
    assert entry["problem"].startswith(problem) and entry["problem"].endswith(folder)


def test_unknown_dataset_and_missing_root(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse rejects the name, listing the choices
        main(["check-data", "--dataset", "kitti", "--root", str(tmp_path)])
    assert e.value.code == 2
    assert "invalid choice: 'kitti'" in capsys.readouterr().err
    assert main(["check-data", "--dataset", "camvid", "--root", str(tmp_path / "nowhere")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    reason = f"{tmp_path / 'nowhere'}: dataset root not found"
    assert captured.err == f"dance check-data: error: {reason}\n"


def test_human_summary_lists_classes_and_problems(tmp_path, capsys):
    missing, *_ = make_broken_cityscapes(tmp_path)
    assert main(["check-data", "--dataset", "cityscapes", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("cityscapes train: 6 samples, 19 classes, 5 problems\n")
    assert "  road " in out and " 8 px " in out
    assert f"  {missing[0]}: mask missing" in out


def test_process_pool_gives_the_same_report(tmp_path):
    make_broken_cityscapes(tmp_path)
    ds = open_dataset("cityscapes", tmp_path, "train")
    serial = check_dataset(ds, workers=1, progress=False)
    pooled = check_dataset(ds, workers=2, progress=False)
    assert pooled == serial and len(serial.problems) == 5
