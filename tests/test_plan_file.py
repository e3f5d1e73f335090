"""Plan files: dance score -> dance plan --out -> dance train data_slimming.plan=FILE."""
import json

import numpy as np
import pytest

from dance.cli import main
from dance.data.plan import load_plan, plan
from dance.errors import DanceError
from tiny import TINY, tiny_synth


@pytest.fixture
def plan_file(tmp_path):
    p = plan(np.arange(6.0), 0.5, [f"im{i}" for i in range(6)])
    f = tmp_path / "plan.json"
    f.write_text(json.dumps(p.to_json()))
    return f, p


def test_a_plan_file_reads_back(plan_file):
    f, p = plan_file
    assert load_plan(f).to_json() == p.to_json()
    assert load_plan(f, ids=[f"im{i}" for i in range(6)], budget=0.5).to_json() == p.to_json()


def test_only_the_order_differs_reorders(plan_file):
    f, p = plan_file
    ids = [f"im{i}" for i in reversed(range(6))]
    q = load_plan(f, ids=ids)
    assert q.ids == ids
    assert [x.scale for x in q.per_image] == [x.scale for x in reversed(p.per_image)]


def _edited(f, edit):
    d = json.loads(f.read_text())
    edit(d)
    f.write_text(json.dumps(d))
    return f


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["per_image"][2].update(scale=5.0), "image 'im2': scale 5"),
    (lambda d: d["per_image"][0].update(keep_prob=float("nan")), "image 'im0' has a non-finite"),
    (lambda d: d["per_image"][1].update(weight=-1.0), "out of range"),
    (lambda d: d.update(budget=3), "budget must be a number in (0, 1], got 3"),
    (lambda d: d.update(schedule="sometimes"), "schedule must be one of"),
    (lambda d: d.update(permutation=[0, 0, 1, 2, 3, 4]), "not a permutation"),
    (lambda d: d.pop("per_image"), "lacks the field 'per_image'"),
    (lambda d: d.update(per_image=[]), "no images"),
])
def test_a_bad_plan_file_is_one_line_naming_it(plan_file, edit, message):
    f = _edited(plan_file[0], edit)
    with pytest.raises(DanceError) as e:
        load_plan(f)
    assert str(f) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_plan_file_problems_name_the_file(tmp_path, plan_file):
    f, _ = plan_file
    for path, message in [(tmp_path / "nope.json", "no such plan file"),
                          (tmp_path, "is a folder"),
                          (tmp_path / "text.json", "not a plan file")]:
        if path.name == "text.json":
            path.write_text("scale: 1\n")
        with pytest.raises(DanceError, match=message):
            load_plan(path)
    with pytest.raises(DanceError, match="made for 6 images, the training set has 7"):
        load_plan(f, ids=[f"im{i}" for i in range(7)])
    with pytest.raises(DanceError, match="made at budget 0.5, this run plans its data at 0.4"):
        load_plan(f, budget=0.4)


def test_train_takes_the_plan_file_dance_plan_wrote(tmp_path_factory, tmp_path, capsys):
    root = tiny_synth(tmp_path_factory, train=8, val=2, seed=5)
    csv, pfile = tmp_path / "scores.csv", tmp_path / "plan.json"
    assert main(["score", "--dataset", "synth", "--root", str(root), "--out", str(csv),
                 "--workers", "1"]) == 0
    # a budget and options of its own, unlike train's defaults: the file is what trains
    cfg = tmp_path / "plan.yaml"
    cfg.write_text("data_slimming: {budget: 0.4, scales_per_epoch: 0, schedule: static}\n")
    assert main(["plan", "--scores", str(csv), "--budget", "0.4", "--config", str(cfg),
                 "--out", str(pfile)]) == 0
    made = json.loads(pfile.read_text())
    common = ["--config", "synth", "--out", str(tmp_path / "run"), f"dataset.root={root}", *TINY,
              "train.epochs=1", "network_slimming.enabled=false", "data_slimming.adaptive=false"]
    capsys.readouterr()
    # at the default budget (0.5) the file does not fit: one line, nothing left behind
    assert main(["train", *common, f"data_slimming.plan={pfile}"]) == 1
    err = capsys.readouterr().err
    assert "made at budget 0.4, this run plans its data at 0.5" in err and str(pfile) in err
    assert not (tmp_path / "run").exists()
    # a missing file is named with its key when the config loads, before any data is read
    assert main(["train", *common, f"data_slimming.plan={tmp_path / 'missing.json'}"]) == 1
    err = capsys.readouterr().err
    assert "data_slimming.plan: no such plan file" in err and len(err.splitlines()) == 1
    assert main(["train", *common, f"data_slimming.plan={pfile}",
                 "data_slimming.budget=0.4"]) == 0
    run = tmp_path / "run"
    assert json.loads((run / "plan.json").read_text()) == made
    fp = json.loads((run / "fingerprint.json").read_text())["config"]["data_slimming"]
    assert fp["plan"].startswith("sha256:") and "schedule" not in fp
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["plan_summary"]["schedule"] == "static"
    assert metrics["planned_cost"] == pytest.approx(made["predicted_cost"], rel=1e-9)
