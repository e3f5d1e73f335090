"""`dance score`: cached, parallel scoring of a dataset split and its CSV."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from dance.cli import main
from dance.data import scoring
from dance.data.complexity import all_indicators
from dance.data.datasets import open_dataset
from dance.data.io import read_image
from dance.data.scoring import (
    CacheWarning,
    ScoreRow,
    read_scores_csv,
    score_dataset,
    write_scores_csv,
)
from dance.errors import DanceError


def make_folder_dataset(root, n=4, size=(24, 32)):
    """A `folder`-layout split whose images grow noisier (more complex) with their index."""
    rng = np.random.default_rng(0)
    (root / "images" / "train").mkdir(parents=True)
    (root / "masks" / "train").mkdir(parents=True)
    (root / "classes.json").write_text(json.dumps(["road", "car", "sky"]))
    for i in range(n):
        base = np.tile(np.linspace(40, 200, size[1]), (size[0], 1))
        noisy = np.clip(base + rng.normal(0, 12 * i, size), 0, 255).astype(np.uint8)
        Image.fromarray(np.stack([noisy] * 3, axis=-1)).save(root / "images/train" / f"im{i}.png")
        mask = (np.indices(size)[1] * (i + 1) // size[1] % 3).astype(np.uint8)
        mask[0] = 255
        Image.fromarray(mask).save(root / "masks/train" / f"im{i}.png")
    return open_dataset("folder", root, "train")


def rewrite_image(path, image):
    """Save new pixels and move the mtime forward, so even a coarse-mtime filesystem sees it."""
    old = os.stat(path).st_mtime_ns
    Image.fromarray(image).save(path)
    os.utime(path, ns=(old + 10**9, old + 10**9))


def decodes():
    return dict(scoring.decode_counts)


def decoded_since(before):
    return {k: scoring.decode_counts[k] - before[k] for k in before}


def test_scores_every_image_in_sample_order(tmp_path):
    ds = make_folder_dataset(tmp_path)
    rows = score_dataset(ds, ("si", "label_boundary"), workers=0, progress=False)
    assert [(r.id, r.indicator) for r in rows] == [
        (f"im{i}", name) for i in range(4) for name in ("si", "label_boundary")]
    for i, sample in enumerate(ds.samples):
        image, mask = ds.load(i)
        expected = all_indicators(image, mask, ("si", "label_boundary"))
        assert rows[2 * i] == ScoreRow(f"im{i}", str(sample.image), "si", expected["si"])
        assert rows[2 * i + 1].score == expected["label_boundary"]
    si = [r.score for r in rows if r.indicator == "si"]
    assert si == sorted(si) and si[0] < si[-1]  # noisier images score higher


def test_process_pool_gives_the_same_scores_and_counts_worker_decodes(tmp_path):
    ds = make_folder_dataset(tmp_path)
    serial = score_dataset(ds, ("si", "entropy", "label_aliasing"), workers=0, progress=False)
    before = decodes()
    parallel = score_dataset(ds, ("si", "entropy", "label_aliasing"), workers=2, progress=False)
    assert parallel == serial
    assert decoded_since(before) == {"image": 4, "mask": 4}  # one decode per file for 3 scores


def test_csv_round_trip_and_header(tmp_path):
    rows = [ScoreRow("a/x_1", "/d/a/x_1.png", "si", 12.345678901234567),
            ScoreRow("b,2", "/d/b,2.png", "si", 0.0),
            ScoreRow("a/x_1", "/d/a/x_1.png", "jpeg", 0.5)]
    path = tmp_path / "scores.csv"
    write_scores_csv(rows, path)
    lines = path.read_text().splitlines()
    assert lines[0] == "id,path,indicator,score"
    assert lines[1] == "a/x_1,/d/a/x_1.png,si,12.345678901234567"
    ids, scores = read_scores_csv(path)  # the first indicator by default
    assert ids == ["a/x_1", "b,2"] and scores.tolist() == [12.345678901234567, 0.0]
    ids, scores = read_scores_csv(path, "jpeg")
    assert ids == ["a/x_1"] and scores.tolist() == [0.5]
    with pytest.raises(DanceError, match="no scores for indicator 'edges'; the file has si, jpeg"):
        read_scores_csv(path, "edges")


@pytest.mark.parametrize("text, problem", [
    (None, "scores file not found"),
    ("", "header must be id,path,indicator,score"),
    ("id,score\na,1\n", "header must be id,path,indicator,score"),
    ("id,path,indicator,score\n", "no scores"),
    ("id,path,indicator,score\na,p,si,high\n", ":2: score 'high' is not a number"),
    ("id,path,indicator,score\na,p,si,nan\n", ":2: score 'nan' is not finite"),
    ("id,path,indicator,score\na,p,si,1\na,p,si,2\n", ":3: id 'a' appears twice"),
])
def test_bad_scores_csv_names_the_file(tmp_path, text, problem):
    path = tmp_path / "scores.csv"
    if text is not None:
        path.write_text(text)
    with pytest.raises(DanceError, match=problem) as err:
        read_scores_csv(path)
    assert str(path) in str(err.value)


def test_cache_rescores_only_changed_files(tmp_path):
    ds = make_folder_dataset(tmp_path / "data")
    cache = tmp_path / "scores.cache.json"
    before = decodes()
    first = score_dataset(ds, ("si", "label_aliasing"), cache_path=cache, workers=0,
                          progress=False)
    assert decoded_since(before) == {"image": 4, "mask": 4}

    before = decodes()
    again = score_dataset(ds, ("si", "label_aliasing"), cache_path=cache, workers=0,
                          progress=False)
    assert again == first and decoded_since(before) == {"image": 0, "mask": 0}

    changed = ds.samples[2].image
    rewrite_image(changed, np.zeros((24, 32, 3), np.uint8))  # now flat: si 0
    before = decodes()
    third = score_dataset(ds, ("si", "label_aliasing"), cache_path=cache, workers=0,
                          progress=False)
    assert decoded_since(before) == {"image": 1, "mask": 0}  # its mask is unchanged
    assert third[4] == ScoreRow("im2", str(changed), "si", 0.0)
    assert [r for i, r in enumerate(third) if i != 4] == [r for i, r in enumerate(first) if i != 4]

    # Same bytes, newer mtime (a re-export, a copy): re-scored, to the same value.
    touched = ds.samples[0].image
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    before = decodes()
    assert score_dataset(ds, ("si", "label_aliasing"), cache_path=cache, workers=0,
                         progress=False) == third
    assert decoded_since(before) == {"image": 1, "mask": 0}

    # Another scale is another score of the masks; the images stay cached.
    before = decodes()
    score_dataset(ds, ("si", "label_aliasing"), cache_path=cache, workers=0, progress=False,
                  scale=0.25)
    assert decoded_since(before) == {"image": 0, "mask": 4}


def test_corrupt_cache_is_ignored_and_replaced(tmp_path):
    ds = make_folder_dataset(tmp_path / "data", n=2)
    expected = score_dataset(ds, "si", workers=0, progress=False)
    cache = tmp_path / "scores.cache.json"
    for garbage in ('{"files": {tru', json.dumps({"format": "something else"})):
        cache.write_text(garbage)
        with pytest.warns(CacheWarning, match="scores.cache.json"):
            assert score_dataset(ds, "si", cache_path=cache, workers=0, progress=False) == expected
        assert json.loads(cache.read_text())["format"] == "dance-score-cache"
        before = decodes()
        score_dataset(ds, "si", cache_path=cache, workers=0, progress=False)
        assert decoded_since(before) == {"image": 0, "mask": 0}


def test_a_file_replaced_with_its_size_and_mtime_kept_is_rescored(tmp_path):
    """``cp -p`` and ``rsync -a`` keep size and mtime; the ctime they cannot keep."""
    ds = make_folder_dataset(tmp_path / "data", n=2)
    cache = tmp_path / "scores.cache.json"
    first = score_dataset(ds, "si", cache_path=cache, workers=0, progress=False)
    path = ds.samples[1].image
    st = os.stat(path)
    other = tmp_path / "flat.png"
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(other)
    data = other.read_bytes()
    assert len(data) <= st.st_size
    path.write_bytes(data + b"\0" * (st.st_size - len(data)))  # same size, PNG ignores the tail
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_size == st.st_size
    again = score_dataset(ds, "si", cache_path=cache, workers=0, progress=False)
    assert again[0] == first[0] and again[1].score == 0.0 != first[1].score


def test_nan_entries_and_other_code_versions_are_not_used(tmp_path, monkeypatch):
    ds = make_folder_dataset(tmp_path / "data", n=2)
    cache = tmp_path / "scores.cache.json"
    first = score_dataset(ds, "si", cache_path=cache, workers=0, progress=False)
    data = json.loads(cache.read_text())
    key = str(ds.samples[0].image.resolve())
    data["files"][key]["scores"]["si"] = float("nan")
    cache.write_text(json.dumps(data))  # json writes NaN, and reads it back
    before = decodes()
    assert score_dataset(ds, "si", cache_path=cache, workers=0, progress=False) == first
    assert decoded_since(before) == {"image": 1, "mask": 0}  # that one entry only
    monkeypatch.setattr(scoring, "INDICATORS_VERSION", 99)
    before = decodes()
    with pytest.warns(CacheWarning, match="other indicator or decoder versions"):
        assert score_dataset(ds, "si", cache_path=cache, workers=0, progress=False) == first
    assert decoded_since(before) == {"image": 2, "mask": 0}


def test_a_full_disk_keeps_the_previous_csv_and_cache(tmp_path, capsys, monkeypatch):
    import errno

    import dance.fileio as fileio
    make_folder_dataset(tmp_path / "data", n=2)
    out = tmp_path / "scores.csv"
    args = ["score", "--dataset", "folder", "--root", str(tmp_path / "data"), "--out", str(out),
            "--workers", "0"]
    assert main(args) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(tmp_path / "data/images/train/im2.png")
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(tmp_path / "data/masks/train/im2.png")

    def full(fd, *args, **kwargs):
        os.close(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(fileio.os, "fdopen", full)
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"dance score: error: {out}: cannot write (No space left on device); "
                       "the previous scores.csv is intact")
    assert err[0].startswith("dance score: warning: could not write the score cache: ")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_scores_done_before_a_bad_file_are_kept(tmp_path):
    ds = make_folder_dataset(tmp_path / "data", n=3)
    (ds.samples[2].image).write_bytes(b"not a png")
    cache = tmp_path / "c.json"
    with pytest.raises(DanceError, match="im2.png: unreadable or truncated image"):
        score_dataset(ds, "si", cache_path=cache, workers=0, progress=False)
    Image.fromarray(read_image(ds.samples[1].image)).save(ds.samples[2].image)
    before = decodes()
    score_dataset(ds, "si", cache_path=cache, workers=0, progress=False)
    assert decoded_since(before) == {"image": 1, "mask": 0}


def test_label_indicator_needs_the_mask(tmp_path):
    ds = make_folder_dataset(tmp_path, n=2)
    (tmp_path / "masks/train/im1.png").unlink()
    ds = open_dataset("folder", tmp_path, "train")
    assert len(score_dataset(ds, "si", workers=0, progress=False)) == 2  # image-only is fine
    with pytest.raises(DanceError, match="im1.png: no label mask, which indicator label_boundary"):
        score_dataset(ds, "label_boundary", workers=0, progress=False)


def test_cli_score_writes_the_csv_and_its_cache(tmp_path, capsys):
    ds = make_folder_dataset(tmp_path / "data")
    out = tmp_path / "scores.csv"
    argv = ["score", "--dataset", "folder", "--root", str(tmp_path / "data"),
            "--indicator", "si,label_aliasing", "--workers", "0"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "8 scores (4 images x 2 indicator(s))" in capsys.readouterr().err
    lines = out.read_text().splitlines()
    assert lines[0] == "id,path,indicator,score" and len(lines) == 1 + 8
    ids, si = read_scores_csv(out, "si")
    expected = score_dataset(ds, "si", workers=0, progress=False)
    assert ids == [f"im{i}" for i in range(4)] and si.tolist() == [r.score for r in expected]
    assert (tmp_path / "scores.csv.cache.json").is_file()

    # Without --out the CSV goes to stdout and the cache into the dataset root.
    assert main([*argv]) == 0
    assert capsys.readouterr().out == out.read_text()
    assert (tmp_path / "data" / scoring.DEFAULT_CACHE_NAME).is_file()

    assert main([*argv[:-4], "--indicator", "si,blur"]) == 1
    assert "unknown complexity indicator 'blur'" in capsys.readouterr().err
