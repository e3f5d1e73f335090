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
