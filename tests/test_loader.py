"""Loading at the planned scale, bad samples, determinism."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dance.data.datasets import open_dataset
from dance.data.loader import PlannedDataset, collate_planned, sample_generator
from dance.data.plan import plan
from dance.data.sampler import BucketedBatchSampler
from dance.data.transforms import TrainTransform
from dance.errors import DanceError

CROP = (32, 48)


@pytest.fixture
def folder(tmp_path):
    """A `folder` dataset of 6 images 40x60 with masks of 2 classes; image 'e' is corrupt."""
    rng = np.random.default_rng(0)
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "masks" / "train").mkdir(parents=True)
    (tmp_path / "classes.txt").write_text("background\nthing\n")
    for name in "abcdef":
        image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
        mask = (rng.random((40, 60)) < 0.3).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "images" / "train" / f"{name}.png")
        Image.fromarray(mask).save(tmp_path / "masks" / "train" / f"{name}.png")
    (tmp_path / "images" / "train" / "e.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return open_dataset("folder", tmp_path, "train")


def test_sample_at_the_planned_scale(folder):
    data = PlannedDataset(folder, TrainTransform(CROP), seed=0)
    item = data[(0, 0.5, 1)]
    assert item["image"].shape == (3, 16, 24) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (16, 24) and item["mask"].dtype == torch.int64
    assert item["index"] == 0 and item["scale"] == 0.5
    assert set(item["mask"].unique().tolist()) <= {0, 1, 255}
    assert data[(0, 1.0, 1)]["image"].shape == (3, 32, 48)


def test_sample_is_fixed_by_seed_epoch_and_index(folder):
    data = PlannedDataset(folder, TrainTransform(CROP), seed=7)
    a, b = data[(2, 0.75, 3)], data[(2, 0.75, 3)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    others = [data[(2, 0.75, e)]["image"] for e in range(4)]
    assert any(not torch.equal(a["image"], o) for o in others)
    g1, g2 = sample_generator(7, -1, 2), sample_generator(7, -1, 2)  # -1: outside any epoch
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_workers_load_the_same_batches_as_one_process(folder):
    data = PlannedDataset(folder, TrainTransform(CROP), seed=1, on_bad_sample="skip")
    p = plan(np.arange(6.0), 0.5, [s.id for s in folder.samples])
    sampler = BucketedBatchSampler(p, batch_size=2, epochs=2, seed=1)
    sampler.set_epoch(1)
    direct = [collate_planned([data[k] for k in b]) for b in sampler]
    loaded = list(DataLoader(data, batch_sampler=sampler, num_workers=2,
                             collate_fn=collate_planned))
    assert len(loaded) == len(direct) == len(sampler)
    for x, y in zip(direct, loaded):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["index"], y["index"])
        assert x["scale"] == y["scale"] and x["skipped"] == y["skipped"]
    # the corrupt image's id reaches the main process from a worker, once per time it is drawn
    drawn = sum(k[0] == 4 for b in sampler for k in b)
    assert drawn >= 1  # keep probability 1 in this plan (a one-image bucket is padded)
    assert sum(b["skipped"].count("e") for b in loaded) == drawn


def test_bad_sample_skip_warns_once_and_is_reported(folder, capsys):
    data = PlannedDataset(folder, TrainTransform(CROP), on_bad_sample="skip")
    bad = [s.id for s in folder.samples].index("e")
    batch = collate_planned([data[(0, 1.0, 0)], data[(bad, 1.0, 0)], data[(bad, 1.0, 1)]])
    assert batch["skipped"] == ["e", "e"] and batch["index"].tolist() == [0]
    assert batch["image"].shape == (1, 3, 32, 48)
    err = capsys.readouterr().err
    assert err.count("skipping bad sample e") == 1 and "e.png" in err
    empty = collate_planned([data[(bad, 0.5, 2)]])
    assert empty["image"].shape[0] == 0 and empty["skipped"] == ["e"]


def test_bad_sample_error_names_the_file(folder):
    data = PlannedDataset(folder, TrainTransform(CROP))
    bad = [s.id for s in folder.samples].index("e")
    with pytest.raises(DanceError, match="e.png"):
        data[(bad, 1.0, 0)]
    with pytest.raises(DanceError, match="on_bad_sample"):
        PlannedDataset(folder, TrainTransform(CROP), on_bad_sample="ignore")


def test_jpeg_is_decoded_at_the_dct_scale_the_sample_needs_with_exact_labels(tmp_path, monkeypatch):
    """A JPEG at scale 0.5 is decoded at 1/2, at 0.25 at 1/4, never below the size the plan's
    scale needs; its mask equals the full-resolution path's, nearest-downsampled."""
    import dance.data.datasets as datasets_module
    from dance.data.io import read_image_at_least
    rng = np.random.default_rng(1)
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "masks" / "train").mkdir(parents=True)
    (tmp_path / "classes.txt").write_text("background\nthing\nother\n")
    for name in "abcd":
        smooth = np.kron(rng.integers(0, 256, (16, 24, 3)), np.ones((16, 16, 1))).astype(np.uint8)
        Image.fromarray(smooth).save(tmp_path / "images" / "train" / f"{name}.jpg", quality=90)
        mask = np.kron(rng.integers(0, 3, (32, 48)), np.ones((8, 8))).astype(np.uint8)
        Image.fromarray(mask).save(tmp_path / "masks" / "train" / f"{name}.png")
    ds = open_dataset("folder", tmp_path, "train")
    decoded = []

    def spy(path, size_for):
        image, stored = read_image_at_least(path, size_for)
        decoded.append((image.shape[:2], size_for(stored)))
        return image, stored

    monkeypatch.setattr(datasets_module, "read_image_at_least", spy)
    transform = TrainTransform((128, 192), scale_range=(0.9, 1.1))
    data = PlannedDataset(ds, transform, seed=3)
    for i in range(len(ds)):
        for scale in (0.25, 0.5, 1.0):
            item = data[(i, scale, 2)]
            image, mask = ds.load(i)  # the full decode, then the same draw
            want_x, want_y = transform(image, mask, scale, sample_generator(3, 2, i))
            assert torch.equal(item["mask"], want_y)
            assert item["image"].shape == want_x.shape
            # the same picture: DCT-domain scaling and an upsampled zoom differ a little
            assert (item["image"] - want_x).abs().mean() < 0.03
    for (h, w), (need_h, need_w) in decoded:  # never below the need
        assert h >= need_h and w >= need_w
    assert [hw for hw, _ in decoded] == [(64, 96), (128, 192), (256, 384)] * len(ds)
    data.reduced_decode = False
    assert data[(0, 0.5, 2)]["image"].shape == (3, 64, 96)
    assert decoded[-1][0] == (256, 384)  # decoded whole


def test_a_truncated_jpeg_is_a_one_line_error_naming_the_file(tmp_path):
    from dance.data.io import read_image, read_image_at_least
    path = tmp_path / "cut.jpg"
    buf = __import__("io").BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[:200])
    for read in (read_image, lambda p: read_image_at_least(p, lambda hw: (8, 8))):
        with pytest.raises(DanceError, match=f"{path}: unreadable or truncated image"):
            read(path)
    with pytest.raises(DanceError, match="file not found"):
        read_image(tmp_path / "absent.jpg")
