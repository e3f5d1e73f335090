"""SynthStreets: determinism, reuse, Cityscapes layout, class spread, complexity spread."""
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import Cityscapes

from dance.cli import main
from dance.data.complexity import label_aliasing, spatial_complexity
from dance.data.datasets import open_dataset
from dance.data.io import read_image, read_mask
from dance.data.synth import complexity_level, generate_synthstreets, render_sample, sample_paths
from dance.errors import DanceError

SIZE = (64, 128)

# Raw Cityscapes label id -> train id (255 ignore), from torchvision's copy of the official table.
LUT = np.full(256, 255, np.uint8)
for _c in Cityscapes.classes:
    if 0 <= _c.id and 0 <= _c.train_id < 255:
        LUT[_c.id] = _c.train_id


def folder_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.fixture(scope="module")
def scenes():
    """100 small scenes drawn in memory: (complexity level, image, train-id mask)."""
    out = []
    for i in range(100):
        image, labels = render_sample(0, "train", i, SIZE)
        out.append((complexity_level(0, "train", i), image, LUT[labels]))
    return out


def test_same_seed_same_bytes_any_workers_and_other_seed_differs(tmp_path):
    a = generate_synthstreets(tmp_path / "a", train=6, val=3, test=1, size=SIZE, seed=3,
                              workers=2, progress=False)
    generate_synthstreets(tmp_path / "b", train=6, val=3, test=1, size=SIZE, seed=3,
                          workers=0, progress=False)
    generate_synthstreets(tmp_path / "c", train=6, val=3, test=1, size=SIZE, seed=4,
                          workers=0, progress=False)
    da, db, dc = (folder_digest(tmp_path / k) for k in "abc")
    assert a["images"] == 10 and not a["reused"] and a["seconds"] > 0
    assert len(da) == 2 * 10 + 1  # image + mask per sample, plus the manifest
    image, mask = sample_paths(tmp_path / "a", "val", 2)
    expected_image, expected_mask = render_sample(3, "val", 2, SIZE)
    assert np.array_equal(read_image(image), expected_image)  # lossless PNG
    assert np.array_equal(read_mask(mask), expected_mask)
    assert da == db  # a process pool writes the same bytes as one process
    pngs = [k for k in da if k.endswith(".png")]
    assert sorted(dc) == sorted(da)  # same names...
    assert all(da[k] != dc[k] for k in pngs)  # ...different pictures


def test_complete_folder_is_reused_and_new_parameters_replace_it(tmp_path):
    generate_synthstreets(tmp_path, train=5, val=2, size=SIZE, progress=False, workers=0)
    image, _ = sample_paths(tmp_path, "train", 0)
    mtime = image.stat().st_mtime_ns
    again = generate_synthstreets(tmp_path, train=5, val=2, size=SIZE, progress=False)
    assert again["reused"] and image.stat().st_mtime_ns == mtime

    # A missing file makes the set incomplete: it is generated again.
    sample_paths(tmp_path, "val", 1)[1].unlink()
    assert not generate_synthstreets(tmp_path, train=5, val=2, size=SIZE, progress=False,
                                     workers=0)["reused"]
    # Fewer images: the files of the larger set are removed, so readers see one generation.
    generate_synthstreets(tmp_path, train=3, val=0, size=SIZE, progress=False, workers=0)
    images = sorted(p.name for p in (tmp_path / "leftImg8bit").rglob("*.png"))
    masks = sorted(p.name for p in (tmp_path / "gtFine").rglob("*.png"))
    assert len(images) == len(masks) == 3
    assert {m.replace("_gtFine_labelIds", "_leftImg8bit") for m in masks} == set(images)


def test_layout_is_what_the_cityscapes_reader_reads(tmp_path):
    generate_synthstreets(tmp_path, train=7, val=2, test=2, size=SIZE, progress=False, workers=0)
    stem = re.compile(r"^(?P<city>[a-z]+)_\d{6}_\d{6}$")
    for split, n in (("train", 7), ("val", 2), ("test", 2)):
        ds = open_dataset("synth", tmp_path, split)
        assert len(ds) == n and ds.num_classes == 19
        for s in ds.samples:
            city, name = s.id.split("/")
            assert stem.match(name) and stem.match(name)["city"] == city
            assert s.image.name == f"{name}_leftImg8bit.png"
            assert s.mask.name == f"{name}_gtFine_labelIds.png"
            assert s.image.parent == tmp_path / "leftImg8bit" / split / city
            assert s.mask.parent == tmp_path / "gtFine" / split / city
        image, mask = ds.load(0)
        assert image.shape == (*SIZE, 3) and image.dtype == np.uint8
        assert mask.shape == SIZE and set(np.unique(mask)) <= set(range(19)) | {255}
    train_cities = {s.id.split("/")[0] for s in open_dataset("synth", tmp_path, "train").samples}
    assert len(train_cities) >= 2


def test_classes_spread_over_a_small_set(scenes):
    present = np.zeros(19, int)
    for _, _, mask in scenes:
        present += np.bincount(mask[mask < 255], minlength=19) > 0
    assert (present > 0).sum() >= 12  # measured 18 of 19 (no trains in SynthStreets)
    for train_id in (0, 1, 2, 5, 7, 8, 10, 11, 13):  # road .. car: common in every city street
        assert present[train_id] >= 20, (train_id, present)


def test_complexity_is_spread_and_tracks_label_aliasing(scenes):
    levels = np.array([c for c, _, _ in scenes])
    si = np.array([spatial_complexity(image, "si") for _, image, _ in scenes])
    aliasing = np.array([label_aliasing(mask, 0.5) for _, _, mask in scenes])
    # Levels cover [0, 1) evenly: every tenth of the range holds 10 +- 2 of the 100 images.
    assert np.all(np.abs(np.histogram(levels, bins=10, range=(0, 1))[0] - 10) <= 2)
    # Wide spreads (measured: SI 36..154, p90/p10 1.9; aliasing 2.1%..9.4%, p90/p10 2.4).
    assert np.percentile(si, 90) / np.percentile(si, 10) > 1.5
    assert np.percentile(aliasing, 90) / np.percentile(aliasing, 10) > 1.8
    # Downsampling hurts complex images more (measured rank correlations 0.58 and 0.77).
    assert spearman(si, aliasing) > 0.4
    assert spearman(levels, aliasing) > 0.6


def test_scene_is_not_trivial_to_segment_by_colour(scenes):
    """Lighting, texture and per-instance colours: a pixel's colour alone does not give its
    class (a nearest-class-mean colour classifier stays far from 100% pixel accuracy)."""
    pixels = np.concatenate([img.reshape(-1, 3) for _, img, _ in scenes]).astype(np.float32)
    labels = np.concatenate([m.ravel() for _, _, m in scenes])
    valid = labels < 255
    pixels, labels = pixels[valid], labels[valid]
    classes = np.unique(labels)
    means = np.stack([pixels[labels == k].mean(0) for k in classes])
    pred = classes[np.argmin(((pixels[:, None] - means[None]) ** 2).sum(-1), axis=1)]
    assert (pred == labels).mean() < 0.6  # measured 22%


def test_cli_writes_the_set_and_rejects_bad_values(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--train", "2", "--val", "1", "--size", "32x64",
                 "--workers", "0"]) == 0
    assert "2 train, 1 val, 0 test" in capsys.readouterr().out
    assert len(list((out / "gtFine").rglob("*_gtFine_labelIds.png"))) == 3
    assert main(["synth", "--out", str(out), "--size", "16x16"]) == 1
    assert "too small" in capsys.readouterr().err
    with pytest.raises(DanceError, match="nothing to generate"):
        generate_synthstreets(out, train=0, val=0, test=0, progress=False)


def test_a_second_scene_family_differs_and_is_deterministic(tmp_path):
    from dance.data.synth import STYLES, render_sample
    day, _ = render_sample(0, "train", 3, (64, 128))
    dusk, labels = render_sample(0, "train", 3, (64, 128), style="suburb-dusk")
    again, labels2 = render_sample(0, "train", 3, (64, 128), style="suburb-dusk")
    assert (dusk == again).all() and (labels == labels2).all()
    assert dusk.mean() < day.mean() - 10  # dusk light is dimmer
    assert set(STYLES) == {"streets", "suburb-dusk"}
    s = generate_synthstreets(tmp_path / "d", train=2, val=1, size=(32, 64), seed=0,
                              workers=0, progress=False, style="suburb-dusk")
    assert s["style"] == "suburb-dusk"
    assert json.loads((tmp_path / "d" / "synthstreets.json").read_text())["style"] == "suburb-dusk"
    # the same folder asked for the other style is regenerated, not reused
    assert not generate_synthstreets(tmp_path / "d", train=2, val=1, size=(32, 64), seed=0,
                                     workers=0, progress=False)["reused"]
    with pytest.raises(DanceError, match="--style 'night' is not a SynthStreets style"):
        generate_synthstreets(tmp_path / "e", train=1, val=1, style="night")
