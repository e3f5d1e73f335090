"""Runs that cannot be silently wrong: fingerprints on resume and in compare, the run-folder
lock, metrics.json as the commit marker, non-finite weights, and bad samples in workers."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dance.cli import main
from dance.engine import train as train_mod
from dance.engine.run_folder import describe_diff, fingerprint_diff, locked
from dance.errors import DanceError
from dance.report.compare import _recorded_fingerprint
from tiny import TINY, tiny_config, tiny_synth

ONE_EPOCH = [*TINY, "train.epochs=1"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_synth(tmp_path_factory, train=32, val=4, seed=3)


@pytest.fixture(scope="module")
def config(synth, tmp_path_factory):
    return tiny_config(tmp_path_factory, synth, "model: {name: deeplabv3plus_mbv2}\n"
                       "data_slimming: {budget: 0.5}\nnetwork_slimming: {enabled: false}\n")


def dance_train(config, out, *extra) -> int:
    return main(["train", "--config", str(config), *ONE_EPOCH, *extra, "--out", str(out),
                 "--quiet"])


def stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_fingerprint_diff_names_dotted_keys():
    old = {"config": {"train": {"epochs": 2, "lr": 0.1}, "data_slimming": {"budget": 0.5}}}
    new = {"config": {"train": {"epochs": 2, "lr": 0.2}, "data_slimming": {"budget": 0.7}}}
    keys = fingerprint_diff(old, new)
    assert keys == ["config.train.lr", "config.data_slimming.budget"]
    assert describe_diff(keys) == "train.lr, data_slimming.budget"
    assert fingerprint_diff(None, new) == ["fingerprint"]
    assert fingerprint_diff(new, json.loads(json.dumps(new))) == []


def test_resume_with_a_changed_budget_is_a_one_line_error_unless_forced(config, tmp_path, capsys):
    out = tmp_path / "run"
    assert dance_train(config, out) == 0
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["dataset"]["train_split"]["samples"] == 32 and fp["dance_version"]
    assert json.loads((out / "metrics.json").read_text())["fingerprint"] == fp
    capsys.readouterr()
    assert dance_train(config, out, "data_slimming.budget=0.7", "--resume") == 1
    err = stderr_lines(capsys)
    assert len(err) == 1 and "data_slimming.budget" in err[0] and "--force" in err[0], err
    # a speed-only key is not part of what determines the result
    assert dance_train(config, out, "train.workers=1", "--resume") == 0
    assert json.loads((out / "metrics.json").read_text())["forced_resume"] is False
    assert dance_train(config, out, "data_slimming.budget=0.7", "--resume", "--force") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["forced_resume"] is True and m["resumed"] is True


def test_a_changed_dataset_is_part_of_the_fingerprint(config, synth, tmp_path, capsys):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(synth, root)
    out = tmp_path / "run"
    assert dance_train(config, out, f"dataset.root={root}") == 0
    victim = sorted((root / "leftImg8bit" / "train").rglob("*.png"))[0]
    victim.unlink()
    capsys.readouterr()
    assert dance_train(config, out, f"dataset.root={root}", "--resume") == 1
    err = stderr_lines(capsys)
    assert len(err) == 1 and "dataset.train_split" in err[0], err


def test_compare_with_a_changed_config_retrains_and_says_so(config, tmp_path, capsys):
    out = tmp_path / "cmp"
    def args(*overrides):
        return ["compare", "--config", str(config), *ONE_EPOCH, *overrides,
                "--runs", "baseline,uniform", "--out", str(out), "--quiet"]
    assert main(args()) == 0
    first = json.loads((out / "report.json").read_text())
    assert first["run_status"] == {"baseline": ["trained"], "uniform": ["trained"]}
    uniform_before = json.loads((out / "runs" / "uniform" / "metrics.json").read_text())
    err = capsys.readouterr().err  # said as each run starts
    assert f"baseline (seed 0): training -> {out / 'runs' / 'baseline'}" in err
    assert "trained ->" not in err
    assert main(args("data_slimming.budget=0.7")) == 0
    err = capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    # the plain run does not depend on the budget, so it is reused; uniform is retrained
    assert report["run_status"]["baseline"] == ["reused"]
    assert report["run_status"]["uniform"] == [
        "retrained (fingerprint differs: data_slimming.budget)"]
    assert "uniform (seed 0): fingerprint differs: data_slimming.budget; retraining" in err
    assert report["config"]["data_slimming"]["budget"] == 0.7
    assert report["runs"]["uniform"]["planned_cost"] == pytest.approx(0.7, abs=0.01)
    kept = json.loads((out / "runs" / "uniform.previous" / "metrics.json").read_text())
    assert kept["planned_cost"] == uniform_before["planned_cost"] == pytest.approx(0.5, abs=0.01)


def test_two_writers_of_one_run_folder(config, tmp_path, capsys):
    out = tmp_path / "busy"
    cmd = [sys.executable, "-m", "dance", "train", "--config", str(config), *TINY,
           "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = out / ".lock"
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text().strip()) and time.time() < deadline:
            assert proc.poll() is None, "the first run ended before the second started"
            time.sleep(0.02)
        capsys.readouterr()
        assert dance_train(config, out) == 1
        err = stderr_lines(capsys)
        assert len(err) == 1 and f"pid {proc.pid}" in err[0], err
        assert proc.poll() is None  # the first writer was not disturbed
    finally:
        proc.kill()
        proc.wait()
    with locked(out):  # a killed writer's lock dies with it
        pass


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with locked(tmp_path), pytest.raises(DanceError, match=f"pid {os.getpid()}"):
        with locked(tmp_path):
            pass


@pytest.mark.slow  # CI: tests/test_faults.py kills a smaller run at before-metrics
def test_kill_between_plan_and_metrics_leaves_an_unfinished_run_that_resumes(config, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dance", "train", "--config", str(config), *ONE_EPOCH,
           "--out", str(out), "--quiet"]
    res = subprocess.run(cmd, env={**os.environ, "DANCE_FAULT_AT": "before-metrics"},
                         capture_output=True, timeout=300)
    assert res.returncode == -9
    assert (out / "plan.json").exists() and not (out / "metrics.json").exists()
    recorded, finished = _recorded_fingerprint(out)
    assert finished is None and recorded == json.loads((out / "fingerprint.json").read_text())
    assert dance_train(config, out, "--resume") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed"] is True and m["history"][-1]["epoch"] == 1


def _poison_weights_after(epoch_to_poison: int, monkeypatch, snapshot: dict):
    real = train_mod.train_one_epoch

    def poisoned(run, state, epoch):
        out = real(run, state, epoch)
        if epoch == epoch_to_poison:
            ckpt = run.ckpt_dir
            snapshot.update({f.name: f.read_bytes() for f in ckpt.glob("*")} if ckpt.exists()
                            else {})
            with torch.no_grad():
                next(run.model.parameters()).view(-1)[0] = float("nan")
        return out
    monkeypatch.setattr(train_mod, "train_one_epoch", poisoned)


def test_nan_weights_at_an_epoch_end_keep_the_previous_checkpoint(config, tmp_path, capsys,
                                                                  monkeypatch):
    out = tmp_path / "nan"
    snapshot: dict = {}
    _poison_weights_after(1, monkeypatch, snapshot)
    capsys.readouterr()
    assert dance_train(config, out, "train.epochs=2") == 1
    err = stderr_lines(capsys)
    assert len(err) == 1 and "non-finite" in err[0] and "after epoch 1) is intact" in err[0], err
    assert set(snapshot) == {"model.safetensors", "trainer.safetensors", "state.json"}
    for name, data in snapshot.items():
        assert (out / "checkpoint" / name).read_bytes() == data, name
    assert not (out / "checkpoint.new").exists() and not (out / "metrics.json").exists()


def test_nan_weights_before_any_checkpoint_say_so(config, tmp_path, capsys, monkeypatch):
    _poison_weights_after(0, monkeypatch, {})
    capsys.readouterr()
    assert dance_train(config, tmp_path / "nan0") == 1
    err = stderr_lines(capsys)
    assert len(err) == 1 and "no checkpoint was written yet" in err[0], err


def folder_dataset(root: Path, n: int = 12, bad_value: int | None = None) -> Path:
    """A 4-class `folder` dataset; one training mask holds ``bad_value`` if given."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    (root / "classes.json").write_text(json.dumps(["a", "b", "c", "d"]))
    for split, count in (("train", n), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(count):
            img = rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)
            mask = np.repeat(np.arange(4, dtype=np.uint8), 32)[None].repeat(64, 0)
            if bad_value is not None and split == "train" and i == 5:
                mask[10:20, 10:20] = bad_value
            Image.fromarray(img).save(root / "images" / split / f"s{i:02d}.png")
            Image.fromarray(mask).save(root / "masks" / split / f"s{i:02d}.png")
    return root


def test_a_bad_mask_in_a_worker_is_one_line_naming_the_file(tmp_path, capsys):
    root = folder_dataset(tmp_path / "data", bad_value=200)
    cfg = tmp_path / "f.yaml"
    cfg.write_text(f"dataset: {{name: folder, root: {root}}}\n"
                   "data_slimming: {enabled: false}\nnetwork_slimming: {enabled: false}\n")
    capsys.readouterr()
    rc = main(["train", "--config", str(cfg), *ONE_EPOCH, "train.workers=2",
               "--out", str(tmp_path / "run"), "--quiet"])
    err = stderr_lines(capsys)
    assert rc == 1 and len(err) == 1, err
    assert "s05.png" in err[0] and "200" in err[0] and "Traceback" not in err[0], err


def test_the_fingerprint_leaves_out_what_cannot_change_the_result():
    from dance.engine.config import config_from_dict
    from dance.engine.run_folder import result_config
    plain = config_from_dict({"data_slimming": {"enabled": False, "budget": 0.3},
                              "train": {"workers": 7, "jitter_follows_scale": True}}).to_dict()
    r = result_config(plain)
    assert r["data_slimming"] == {"enabled": False} and "workers" not in r["train"]
    assert "jitter_follows_scale" not in r["train"]  # every image at scale 1: no effect
    slim = config_from_dict({"train": {"jitter_follows_scale": True}}).to_dict()
    assert result_config(slim)["train"]["jitter_follows_scale"] is True
    uniform = config_from_dict({"data_slimming": {"policy": "uniform", "drop": True}}).to_dict()
    assert result_config(uniform)["data_slimming"] == {"enabled": True, "policy": "uniform",
                                                       "budget": 0.5}
    threads = config_from_dict({"train": {"threads": 1}}).to_dict()
    assert "threads" not in result_config(threads)["train"]  # speed only
    prog = config_from_dict({"data_slimming": {"policy": "progressive", "final_full": 0.2,
                                               "scales_per_epoch": 2}}).to_dict()
    assert result_config(prog)["data_slimming"] == {"enabled": True, "policy": "progressive",
                                                    "budget": 0.5, "final_full": 0.2}
    # as many epochs as the plain run is no key (runs made before stretch existed still match);
    # a stretch counts, for the controls too
    assert "stretch" not in result_config(config_from_dict({}).to_dict())["data_slimming"]
    for policy in ("dance", "uniform", "progressive"):
        stretch = result_config(config_from_dict({"data_slimming": {
            "policy": policy, "stretch": 1.5}}).to_dict())["data_slimming"]
        assert stretch["stretch"] == 1.5
    # a decode cache off is no key at all (runs made before it existed still match); on, its
    # folder does not matter, its size does (it decides which images come from a stored level)
    assert not {"decode_cache", "decode_cache_gb"} & set(r["train"])
    cached = [result_config(config_from_dict({"train": {"decode_cache": f"/tmp/{d}"}}).to_dict())
              for d in ("a", "b")]
    assert cached[0] == cached[1] and cached[0]["train"]["decode_cache"] is True
    assert cached[0]["train"]["decode_cache_gb"] == 20.0
    # prune points over the whole run are no key (as before the window existed: no window, or one
    # at least as long as the run); a window that moves the points counts
    assert "prune_within_epochs" not in r["network_slimming"]  # 32 epochs of a 4-epoch run

    def window(epochs, within):
        return result_config(config_from_dict({
            "train": {"epochs": epochs},
            "network_slimming": {"prune_within_epochs": within}}).to_dict())["network_slimming"]
    assert window(192, 32)["prune_within_epochs"] == 32
    assert "prune_within_epochs" not in window(24, 32) and "prune_within_epochs" not in \
        window(192, None)
    # the sparsity term kept after the last pruning point is what every run did before the key
    # existed: no key; off (the default) counts, so those runs are not taken for today's
    assert r["network_slimming"]["sparsity_after_last_point"] is False
    kept = result_config(config_from_dict({"network_slimming": {
        "sparsity_after_last_point": True}}).to_dict())["network_slimming"]
    assert "sparsity_after_last_point" not in kept
    # no limit on a group's cut is no key; a limit counts
    assert "max_channel_cut" not in r["network_slimming"]
    cut = result_config(config_from_dict({"network_slimming": {
        "max_channel_cut": 0.5}}).to_dict())["network_slimming"]
    assert cut["max_channel_cut"] == 0.5
    # reviving dead channels off (the default) is no key; on counts
    assert "revive_dead" not in r["network_slimming"]
    revived = result_config(config_from_dict({"network_slimming": {
        "revive_dead": True}}).to_dict())["network_slimming"]
    assert revived["revive_dead"] is True
    # the pixel probe loss (the default) is no key; the class-balanced one counts
    assert "probe_loss" not in r["network_slimming"]
    balanced = result_config(config_from_dict({"network_slimming": {
        "probe_loss": "class_balanced"}}).to_dict())["network_slimming"]
    assert balanced["probe_loss"] == "class_balanced"
    # keeping the optimizer state through removals off is no key (as before the key existed),
    # and so is auto without data slimming (it resolves to off); on, and auto, count
    assert "keep_optimizer_state" not in r["network_slimming"]

    def slimming(data=None, network=None):
        return result_config(config_from_dict({"data_slimming": data or {},
                                               "network_slimming": network or {}}).to_dict())
    assert "keep_optimizer_state" not in slimming(
        network={"keep_optimizer_state": False})["network_slimming"]
    assert slimming()["network_slimming"]["keep_optimizer_state"] == "auto"
    assert slimming(network={"keep_optimizer_state": True})["network_slimming"][
        "keep_optimizer_state"] is True
    # no drop_above (null) is no key; a threshold, 0.8 by default, counts
    assert "drop_above" not in r["data_slimming"]
    assert "drop_above" not in slimming(data={"drop_above": None})["data_slimming"]
    assert slimming()["data_slimming"]["drop_above"] == 0.8
