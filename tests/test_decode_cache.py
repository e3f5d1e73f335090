"""The decode cache: PNG images and masks decoded once, read back at the smallest stored level
that covers the plan's scale, never stale, bounded, and robust to damaged entries."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import dance.data.io as io
from dance.data.datasets import open_dataset
from dance.data.decode_cache import DecodeCache
from dance.data.loader import PlannedDataset
from dance.data.transforms import TrainTransform
from dance.errors import DanceError


def make_folder(root, n=3, hw=(64, 96), jpeg_first=False):
    rng = np.random.default_rng(0)
    (root / "images" / "train").mkdir(parents=True)
    (root / "masks" / "train").mkdir(parents=True)
    (root / "classes.json").write_text('["a", "b", "c"]')
    for i in range(n):
        # smooth, as photos are: 8x8-pixel blobs of colour, upsampled
        blobs = Image.fromarray(rng.integers(0, 256, (hw[0] // 8, hw[1] // 8, 3), dtype=np.uint8))
        image = blobs.resize(hw[::-1], Image.BILINEAR)
        suffix = ".jpg" if jpeg_first and i == 0 else ".png"
        image.save(root / "images" / "train" / f"im{i}{suffix}")
        Image.fromarray(rng.integers(0, 3, hw, dtype=np.uint8)).save(
            root / "masks" / "train" / f"im{i}.png")
    return open_dataset("folder", root, "train")


@pytest.fixture
def decodes(monkeypatch):
    """Counts the files decoded by Pillow (PNG images and masks)."""
    calls = []
    real = io.open_image

    def counting(path, what="image"):
        calls.append(str(path))
        return real(path, what)
    monkeypatch.setattr(io, "open_image", counting)
    return calls


def test_files_are_decoded_once_then_read_from_the_cache(tmp_path, decodes):
    ds = make_folder(tmp_path / "data")
    cache = DecodeCache(tmp_path / "cache", max_gb=1)
    full = lambda hw: hw  # noqa: E731
    first = [ds.load(i, size_for=full, map_labels=False, cache=cache) for i in range(3)]
    assert len(decodes) == 6 and cache.misses == 6
    again = [ds.load(i, size_for=full, map_labels=False, cache=cache) for i in range(3)]
    assert len(decodes) == 6 and cache.hits == 6  # nothing decoded the second time
    plain = [ds.load(i, size_for=full, map_labels=False) for i in range(3)]
    for (a_img, a_mask), (b_img, b_mask), (c_img, c_mask) in zip(first, again, plain):
        assert np.array_equal(a_img, c_img) and np.array_equal(b_img, c_img)
        assert np.array_equal(a_mask, c_mask) and np.array_equal(b_mask, c_mask)


def test_the_smallest_level_that_covers_the_need_is_read(tmp_path):
    ds = make_folder(tmp_path / "data")
    cache = DecodeCache(tmp_path / "cache", max_gb=1)
    ds.load(0, size_for=lambda hw: hw, map_labels=False, cache=cache)  # stores all levels
    for need, shape in [((64, 96), (64, 96)), ((33, 40), (64, 96)), ((32, 48), (32, 48)),
                        ((20, 30), (32, 48)), ((16, 24), (16, 24)), ((3, 3), (16, 24))]:
        image, raw = ds.load(0, size_for=lambda hw, n=need: n, map_labels=False, cache=cache)
        assert image.shape == (*shape, 3), need
        assert raw.shape == (64, 96)  # masks always whole: labels exactly the file's


def test_a_changed_file_is_decoded_again(tmp_path, decodes):
    ds = make_folder(tmp_path / "data", n=1)
    cache = DecodeCache(tmp_path / "cache", max_gb=1)
    ds.load(0, size_for=lambda hw: hw, map_labels=False, cache=cache)
    new_mask = np.full((64, 96), 2, np.uint8)
    Image.fromarray(new_mask).save(ds.samples[0].mask)
    _, raw = ds.load(0, size_for=lambda hw: hw, map_labels=False, cache=cache)
    assert np.array_equal(raw, new_mask) and cache.misses == 3


def test_jpeg_images_are_not_stored_their_masks_are(tmp_path, decodes):
    ds = make_folder(tmp_path / "data", n=1, jpeg_first=True)
    cache = DecodeCache(tmp_path / "cache", max_gb=1)
    for _ in range(2):
        image, _ = ds.load(0, size_for=lambda hw: (hw[0] // 2, hw[1] // 2), map_labels=False,
                           cache=cache)
    assert image.shape == (32, 48, 3)  # libjpeg's 1/2 decode
    assert cache.misses == 1 and cache.hits == 1  # the mask
    assert sorted(p.name.split(".")[1] for p in (tmp_path / "cache").rglob("*.npy")) == ["mask"]


def test_the_cache_stays_within_its_size(tmp_path):
    ds = make_folder(tmp_path / "data", n=3)
    one_image = 64 * 96 * 3 * (1 + 1 / 4 + 1 / 16) + 3 * 128  # three levels with headers
    cache = DecodeCache(tmp_path / "cache", max_gb=1.5 * one_image / 2**30)
    loaded = [ds.load(i, size_for=lambda hw: hw, map_labels=False, cache=cache) for i in range(3)]
    stored = sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*.npy"))
    assert 0 < stored <= cache.max_bytes
    for (image, raw), i in zip(loaded, range(3)):  # loading goes on from the files
        want_image, want_raw = ds.load(i, size_for=lambda hw: hw, map_labels=False)
        assert np.array_equal(image, want_image) and np.array_equal(raw, want_raw)


def test_a_damaged_entry_is_decoded_and_written_again(tmp_path):
    ds = make_folder(tmp_path / "data", n=1)
    cache = DecodeCache(tmp_path / "cache", max_gb=1)
    want = ds.load(0, size_for=lambda hw: hw, map_labels=False, cache=cache)
    for entry in (tmp_path / "cache").rglob("*.npy"):
        entry.write_bytes(entry.read_bytes()[:50])  # truncated
    got = ds.load(0, size_for=lambda hw: hw, map_labels=False, cache=cache)
    assert all(np.array_equal(a, b) for a, b in zip(want, got))
    got = ds.load(0, size_for=lambda hw: hw, map_labels=False, cache=cache)  # rewritten whole
    assert cache.hits == 2 and all(np.array_equal(a, b) for a, b in zip(want, got))


def test_bad_files_are_still_named_through_the_cache(tmp_path):
    ds = make_folder(tmp_path / "data", n=1)
    cache = DecodeCache(tmp_path / "cache", max_gb=1)
    ds.samples[0].image.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DanceError, match=r"im0.png: unreadable or truncated image"):
        ds.load(0, size_for=lambda hw: hw, map_labels=False, cache=cache)
    with pytest.raises(DanceError, match="size must be positive"):
        DecodeCache(tmp_path / "cache", max_gb=0)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DanceError, match="afile: decode cache exists and is not a folder"):
        DecodeCache(tmp_path / "afile", max_gb=1)


def test_planned_samples_keep_their_labels_with_the_cache(tmp_path):
    """Through the training loader at every plan scale: masks identical to the uncached path,
    images within the rounding of the two-step (stored level, then draw) resize."""
    ds = make_folder(tmp_path / "data", n=3, hw=(128, 256))
    transform = TrainTransform((64, 128), scale_range=(0.5, 2.0))
    plain = PlannedDataset(ds, transform, seed=0)
    cached = PlannedDataset(ds, transform, seed=0,
                            decode_cache=DecodeCache(tmp_path / "cache", max_gb=1))
    for epoch in range(2):
        for scale in (0.5, 0.75, 1.0):
            for i in range(3):
                a, b = plain[(i, scale, epoch)], cached[(i, scale, epoch)]
                assert torch.equal(a["mask"], b["mask"])
                assert a["image"].shape == b["image"].shape
                assert (a["image"] - b["image"]).abs().mean() < 0.02


def test_a_training_run_fills_the_cache_and_a_second_reads_it(tmp_path_factory, tmp_path):
    from dance.cli import main
    from tiny import TINY, tiny_config, tiny_synth
    root = tiny_synth(tmp_path_factory, 8, 4, seed=1)
    config = tiny_config(tmp_path_factory, root, "model: {name: deeplabv3plus_mbv2}\n")
    cache = tmp_path / "decoded"
    args = ["train", "--config", str(config), *TINY, "train.epochs=1",
            "network_slimming.enabled=false", f"train.decode_cache={cache}"]
    assert main([*args, "--out", str(tmp_path / "first")]) == 0
    entries = {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")}
    assert len(entries) == 8 * 4  # each training image at three levels, and its mask
    assert main([*args, "--out", str(tmp_path / "second")]) == 0
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")} == entries  # only read
    (tmp_path / "file").write_text("x")
    assert main([*args[:-1], f"train.decode_cache={tmp_path / 'file'}",
                 "--out", str(tmp_path / "third")]) != 0
