"""End to end on tiny SynthStreets, on the CPU: plain and DANCE runs, cost accounting, eval,
export, resume after kill -9, NaN handling, bad samples, and a 2-process gloo torchrun."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import dance
from dance.cli import main
from tiny import TINY, tiny_synth


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_synth(tmp_path_factory, train=96, val=6, seed=1)


@pytest.fixture(scope="module")
def config(synth, tmp_path_factory):
    f = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    f.write_text(f"""
dataset: {{name: synth, root: {synth}}}
model: {{name: deeplabv3plus_mbv2}}
train: {{seed: 0}}
data_slimming: {{enabled: true, budget: 0.5, joint_budget: false}}
network_slimming: {{enabled: true, prune_at: [0.5], network_budget: 0.8}}
""")
    return f


def run_train(config, out, *extra):
    rc = main(["train", "--config", str(config), *TINY, *extra, "--out", str(out), "--quiet"])
    assert rc == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(config, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    plain = run_train(config, base / "plain", "data_slimming.enabled=false",
                      "network_slimming.enabled=false")
    dance_m = run_train(config, base / "dance")
    return base, plain, dance_m


REQUIRED = ("miou", "per_class_iou", "pixel_acc", "params", "gflops", "latency_ms", "input_size",
            "peak_memory_mb", "train_gflops_total", "train_seconds", "energy_joules",
            "energy_kind", "planned_cost", "realised_cost", "removed_branches", "skipped_samples")


def test_plain_and_dance_runs_end_to_end(runs):
    base, plain, d = runs
    for m in (plain, d):
        assert all(k in m for k in REQUIRED)
        assert 0 <= m["miou"] <= 100 and m["energy_kind"] in ("measured", "estimated")
        assert m["energy_joules"] > 0 and m["latency_ms"] > 0 and m["peak_memory_mb"] > 0
    assert plain["planned_cost"] == 1.0 and abs(plain["realised_cost"] - 1.0) < 1e-9
    assert plain["removed_branches"] == []
    # realised training FLOPs land within +-3% of the plan
    assert abs(d["realised_cost"] - d["planned_cost"]) <= 0.03 * d["planned_cost"]
    assert d["train_gflops_total"] < 0.7 * plain["train_gflops_total"]
    # the network budget forced a structural removal: the deployed model is smaller
    assert d["removed_branches"] and d["gflops"] < plain["gflops"] and d["params"] < plain["params"]
    assert (base / "dance" / "checkpoint" / "model.safetensors").is_file()
    assert (base / "dance" / "checkpoint" / "state.json").is_file()
    assert list((base / "dance" / "tensorboard").iterdir())


def test_eval_of_saved_run_equals_its_own_miou(runs, synth, capsys):
    base, _, d = runs
    rc = main(["eval", "--checkpoint", str(base / "dance"), "--dataset", "synth",
               "--root", str(synth), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["miou"] == pytest.approx(d["miou"], abs=1e-6)
    assert out["gflops"] == pytest.approx(d["gflops"], rel=1e-9)


def test_onnx_export_of_slimmed_run_matches_load_model(runs, tmp_path):
    import onnxruntime as ort
    base, _, d = runs
    onnx_file = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(base / "dance" / "checkpoint"), "--format", "onnx",
                 "--out", str(onnx_file)]) == 0
    model = dance.load_model(base / "dance")
    assert model.dance_arch.removed_branches == d["removed_branches"]
    assert d["removed_channels"] > 0  # the network budget is met by channels as well
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 64, 128), (2, 3, 96, 160)]:  # dynamic batch, height and width
        x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(got, ref, atol=1e-4)
    # what a deployment needs besides the weights travels in the file
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["dance.classes"])[:3] == ["road", "sidewalk", "building"]
    assert meta["dance.model"] == "deeplabv3plus_mbv2" and "[0, 1]" in meta["dance.input"]
    assert json.loads(meta["dance.mean"]) == [0.485, 0.456, 0.406]
    shape = sess.get_outputs()[0].shape
    assert shape == ["batch", 19, "height", "width"] and sess.get_inputs()[0].shape[2] == "height"


def test_channels_last_on_the_cpu_holds_through_a_removal(config, synth, tmp_path, capsys,
                                                          monkeypatch):
    """train.channels_last=always puts the model and its inputs in channels-last layout on the
    CPU too, and keeps the layers a channel removal rebuilds in it; the saved run evaluates to
    its own mIoU. The default (true: on CUDA) leaves a CPU run in the usual layout."""
    import dance.engine.train as engine
    seen = []
    step = engine.optimizer_step

    def spy(run, batch, weights, mean_scale):
        convs = [m.weight for m in run.model.modules() if isinstance(m, torch.nn.Conv2d)
                 and m.weight.shape[1] > 1 and m.weight[0, 0].numel() > 1]
        # (a 1x1 or depthwise weight is in both layouts at once)
        seen.append((len(run.model.dance_arch.removed), all(
            w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
            for w in convs)))
        return step(run, batch, weights, mean_scale)
    monkeypatch.setattr(engine, "optimizer_step", spy)
    m = run_train(config, tmp_path / "cl", "train.channels_last=always")
    assert m["removed_channels"] > 0
    assert {layout for _, layout in seen} == {True}
    assert len({removed for removed, _ in seen}) > 1  # steps before and after the removal
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "cl"), "--dataset", "synth",
                 "--root", str(synth), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["miou"] == pytest.approx(m["miou"], abs=1e-6)
    seen.clear()
    run_train(config, tmp_path / "default", "network_slimming.enabled=false", "train.epochs=1")
    assert seen and {layout for _, layout in seen} == {False}


@pytest.mark.slow  # CI: tests/test_faults.py kills and resumes a smaller run at chosen points
def test_resume_after_kill_gives_the_same_metrics(runs, config, tmp_path):
    _, _, uninterrupted = runs
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dance", "train", "--config", str(config), *TINY,
           "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "run ended before it could be killed mid-way"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists()
    assert json.loads(state.read_text())["train_state"]["epoch"] == 1
    assert main(["train", "--config", str(config), *TINY, "--out", str(out), "--quiet",
                 "--resume"]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["resumed"] is True
    for k in ("miou", "pixel_acc", "train_gflops_total", "realised_cost", "gflops"):
        assert resumed[k] == pytest.approx(uninterrupted[k], rel=1e-6, abs=1e-6), k
    assert resumed["removed_branches"] == uninterrupted["removed_branches"]


@pytest.mark.slow  # CI: tests/test_faults.py kills a smaller run at checkpoint-swap
def test_kill_during_the_checkpoint_swap_resumes_from_checkpoint_new(runs, config, tmp_path):
    _, _, uninterrupted = runs
    out = tmp_path / "swap"
    cmd = [sys.executable, "-m", "dance", "train", "--config", str(config), *TINY,
           "--out", str(out), "--quiet"]
    res = subprocess.run(cmd, env={**os.environ, "DANCE_FAULT_AT": "checkpoint-swap"},
                         capture_output=True, timeout=300)
    assert res.returncode == -signal.SIGKILL
    assert (out / "checkpoint.new" / "state.json").is_file() and not (out / "checkpoint").exists()
    assert main(["train", "--config", str(config), *TINY, "--out", str(out), "--quiet",
                 "--resume"]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["resumed"] is True and not (out / "checkpoint.new").exists()
    for k in ("miou", "pixel_acc", "train_gflops_total", "realised_cost", "gflops"):
        assert resumed[k] == pytest.approx(uninterrupted[k], rel=1e-6, abs=1e-6), k


def test_nan_loss_stops_with_one_line_and_keeps_checkpoint(runs, config, tmp_path, capsys):
    import shutil
    base, _, _ = runs
    out = tmp_path / "nan"
    shutil.copytree(base / "plain", out)  # a finished 2-epoch run, continued for a third
    before = (out / "checkpoint" / "model.safetensors").read_bytes()
    (out / "metrics.json").unlink()
    rc = main(["train", "--config", str(config), *TINY, "data_slimming.enabled=false",
               "network_slimming.enabled=false", "train.epochs=3", "train.lr=1e12",
               "--out", str(out), "--quiet", "--resume", "--force"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "loss became" in err[0]
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before
    dance.load_model(out)  # still a valid checkpoint


def test_resume_with_another_architecture_is_a_clear_error(runs, config, capsys):
    base, _, _ = runs
    rc = main(["train", "--config", str(config), *TINY, "model.name=pspnet_r18",
               "model.options={}", "--out", str(base / "plain"), "--resume"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "deeplabv3plus_mbv2" in err and "pspnet_r18" in err
    # an option the model does not take is named, not a traceback
    rc = main(["train", "--config", str(config), *TINY, "model.name=pspnet_r18",
               "--out", str(base / "other")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "model 'pspnet_r18' has no option" in err


def test_bad_sample_skip_and_error(synth, config, tmp_path, capsys):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(synth, root)
    victim = sorted((root / "leftImg8bit" / "train").rglob("*.png"))[3]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated
    cfg_over = [f"dataset.root={root}", "network_slimming.enabled=false",
                "data_slimming.enabled=false", "train.epochs=1"]
    rc = main(["train", "--config", str(config), *TINY, *cfg_over, "--out",
               str(tmp_path / "err"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and victim.name in err[-1]
    m = run_train(config, tmp_path / "skip", *cfg_over, "--on-bad-sample", "skip")
    sample_id = f"{victim.parent.name}/{victim.name.removesuffix('_leftImg8bit.png')}"
    assert m["skipped_samples"] == 1 and m["skipped_files"] == [sample_id]


def test_two_process_gloo_torchrun(config, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dance", "train", "--config", str(config), *TINY, "train.epochs=1",
           "--out", str(out), "--quiet"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2
    # every rank runs equal batches of one scale, so short buckets are padded with repeats: on
    # 96 images that is a few percent of real extra compute, counted honestly
    assert abs(m["realised_cost"] - m["planned_cost"]) <= 0.08 * m["planned_cost"]
    assert m["removed_branches"]  # both ranks removed the same branch and finished


def test_a_joint_budget_spends_the_network_saving_on_data(runs, config, tmp_path):
    """With data_slimming.joint_budget the budget is the whole run's training FLOPs: the data
    plan is made at budget / the network's expected FLOPs fraction (0.5 / 0.7 here), and the
    run's total lands on the budget while its data plan alone costs more."""
    _, plain, _ = runs  # the plain run of this config
    m = run_train(config, tmp_path / "joint", "data_slimming.policy=uniform",
                  "data_slimming.joint_budget=true", "network_slimming.prune_at=[0.25]",
                  "network_slimming.network_budget=0.6")
    assert m["planned_cost"] == pytest.approx(0.5 / 0.7, abs=0.02)
    assert m["removed_channels"] > 0
    total = m["train_gflops_total"] / plain["train_gflops_total"]
    assert abs(total - 0.5) <= 0.03, total
    assert m["total_cost"] == pytest.approx(total, rel=0.01)
    assert m["cost_note"] is None  # the joint budget is checked on the total
    assert m["realised_cost"] > 0.6  # the data side alone, priced on the original architecture


def optimizer_steps(run_dir) -> set[int]:
    """The step counts of every parameter's AdamW state in a run's last checkpoint."""
    from safetensors.torch import load_file
    state = load_file(str(run_dir / "checkpoint" / "trainer.safetensors"))
    return {int(v) for k, v in state.items() if k.startswith("optim/") and k.endswith("/step")}


def test_a_joint_plan_that_cuts_little_is_the_long_run_regime(runs, config, tmp_path):
    """data_slimming.drop_above: the joint budget leaves the data plan 0.71 of its cost (as in
    the test above), at least the threshold, so the plan drops the least complex images' steps
    at full scale instead of downscaling, and keep_optimizer_state "auto" carries the optimizer
    state through the removal; the log says so and the total still lands on 0.5. Below the
    threshold, neither."""
    _, plain, _ = runs
    joint = ("data_slimming.joint_budget=true", "data_slimming.schedule=static",
             "network_slimming.prune_at=[0.25]", "network_slimming.network_budget=0.6",
             "train.optimizer=adamw", "train.lr=0.002")
    out = tmp_path / "long"
    m = run_train(config, out, *joint, "data_slimming.drop_above=0.7")
    assert m["planned_cost"] == pytest.approx(0.5 / 0.7, abs=0.02)
    assert m["prune_events"][0]["channels"]  # the removal sliced layers
    p = json.loads((out / "plan.json").read_text())
    assert p["drop"] and not p["downsample"] and p["keep_min"] < 1.0
    assert {q["scale"] for q in p["per_image"]} == {1.0}
    log = (out / "train.log").read_text()
    assert "dropping the least complex images' steps" in log and "keeping the optimizer" in log
    assert "(drop_above 0.7, network budget 0.6)" in log
    assert len(optimizer_steps(out)) == 1  # every parameter's state counts every step
    total = m["train_gflops_total"] / plain["train_gflops_total"]
    assert abs(total - 0.5) <= 0.03, total
    short = tmp_path / "short"  # a plan that cuts more than the threshold allows: as written
    run_train(config, short, *joint, "data_slimming.drop_above=0.8")
    p = json.loads((short / "plan.json").read_text())
    assert p["downsample"] and not p["drop"]
    assert "dropping" not in (short / "train.log").read_text()
    assert len(optimizer_steps(short)) > 1  # the sliced layers restarted from empty state


def test_a_joint_budget_prices_the_ramp_against_the_slimming_network(runs, config, tmp_path):
    """A progressive plan spends most in its last epochs, when the network is slimmest: planned
    at budget / the mean fraction it would land under its budget (0.47 here); priced epoch by
    epoch (epoch 0 at 0.8 of the FLOPs, epoch 1 at 0.6) its data budget is 0.75, and the run's
    total lands on 0.5."""
    _, plain, _ = runs
    m = run_train(config, tmp_path / "ramp", "data_slimming.policy=progressive",
                  "data_slimming.joint_budget=true", "network_slimming.prune_at=[0.25]",
                  "network_slimming.network_budget=0.6")
    assert m["planned_cost"] == pytest.approx(0.75, abs=0.02)
    total = m["train_gflops_total"] / plain["train_gflops_total"]
    assert abs(total - 0.5) <= 0.03 * 0.5, total
    # the trim prices the epochs to come at the network expected then: the run is planned
    # at its full length from the first epoch on (priced on the unslimmed model: 1.5 epochs)
    assert m["history"][0]["horizon"] > 1.8, [h["horizon"] for h in m["history"]]


def test_the_joint_data_budget_makes_the_expected_cost_the_budget():
    from dance.data.plan import progressive_plan
    from dance.engine.config import load_config
    from dance.engine.train import data_budget
    from dance.network.slimming import NetworkSlimmer
    cfg = load_config(None)
    cfg.data_slimming.budget = 0.5
    cfg.network_slimming.network_budget = 0.5
    cfg.train.epochs = 24
    ids = [str(i) for i in range(40)]
    draft = progressive_plan(ids, 0.5)
    b = data_budget(cfg, draft)
    f = [NetworkSlimmer.expected_fraction([0.3, 0.5, 0.7], 0.5, e / 24, (e + 1) / 24)
         for e in range(24)]
    assert np.mean(draft.epoch_costs(24, b) * f) == pytest.approx(0.5, abs=1e-6)
    assert b > 0.5 / 0.75 + 0.03  # the flat rule's 0.667 would spend 0.464
    assert data_budget(cfg) == pytest.approx(0.5 / 0.75)  # static plans: flat epochs
    cfg.data_slimming.budget = 0.9  # more than the slimming network can spend: capped at 1
    assert data_budget(cfg, draft) == 1.0


def test_the_joint_budget_warning_names_its_cause():
    """Under budget with the data plan whole (network_budget 0.4 in a 192-epoch run spent
    0.448 of 0.5): the data cannot spend the saving, not a network off its expected path."""
    from dance.engine.train import joint_budget_note
    assert joint_budget_note(0.51, 0.5, 0.93) is None  # within 3%
    whole = joint_budget_note(0.448, 0.5, 1.0)
    assert "-10.4% off the joint budget 0.500" in whole and "data plan is whole" in whole
    assert "expected mean FLOPs fraction" not in whole
    assert "landed below its expected" in joint_budget_note(0.44, 0.5, 0.93)
    assert "landed above its expected" in joint_budget_note(0.56, 0.5, 1.0)


def test_a_long_run_is_slimmed_within_its_first_epochs():
    """prune_within_epochs: the points are fractions of the first 32 of 192 epochs, so the
    slimmer prunes at 5%, 8.3% and 11.7% of the run and the static data plan, priced at the
    network's expected fraction, buys back resolution (0.5 / 0.546 instead of 0.5 / 0.75)."""
    from dance.engine.config import load_config
    from dance.engine.train import data_budget, make_slimmer
    from dance.network.registry import build_model
    cfg = load_config(None, ["train.epochs=192", "network_slimming.network_budget=0.5",
                             "network_slimming.prune_within_epochs=32", "train.crop=[32,64]"])
    assert cfg.network_slimming.points(192) == pytest.approx([0.05, 0.5 / 6, 0.7 / 6])
    assert cfg.network_slimming.points(24) == [0.3, 0.5, 0.7]  # a shorter run: unchanged
    assert cfg.network_slimming.points(32) == [0.3, 0.5, 0.7]
    slimmer = make_slimmer(cfg, build_model(cfg.model.name, 19, **cfg.model.options))
    assert slimmer.prune_at == pytest.approx([0.05, 0.5 / 6, 0.7 / 6])
    assert not slimmer.due(0.049) and slimmer.due(0.05)
    mean = (0.05 + (0.5 / 6 - 0.05) * 5 / 6 + (0.7 / 6 - 0.5 / 6) * 4 / 6 + (1 - 0.7 / 6) * 0.5)
    assert data_budget(cfg) == pytest.approx(0.5 / mean)
    cfg.network_slimming.prune_within_epochs = None
    assert data_budget(cfg) == pytest.approx(0.5 / 0.75)


@pytest.mark.slow  # what the trim below is for
def test_without_the_trim_a_uniform_run_overspends(config, tmp_path):
    """sqrt(0.5) crops round up to 48x88 (over 0.51x the FLOPs of 64x128)."""
    over = run_train(config, tmp_path / "over", "data_slimming.policy=uniform",
                     "data_slimming.trim_to_budget=false", "network_slimming.enabled=false")
    assert over["realised_cost"] > 0.51 and over["trained_epochs"] == 2


def test_runs_are_trimmed_to_spend_their_budget(config, tmp_path, tmp_path_factory):
    """A uniform run's crops round up to multiples of 8 (above): with the trim the run stops at
    the step that lands on the budget."""
    fair = run_train(config, tmp_path / "fair", "data_slimming.policy=uniform",
                     "network_slimming.enabled=false")
    assert abs(fair["realised_cost"] - 0.5) <= 0.01 and fair["trained_epochs"] < 2
    assert fair["cost_note"] is None
    # a small set at batch 4, where tiny scale buckets are padded to whole batches
    small = tiny_synth(tmp_path_factory, train=24, val=2, seed=5)
    cfg = tmp_path / "small.yaml"
    cfg.write_text(f"dataset: {{name: synth, root: {small}}}\nmodel: {{name: deeplabv3plus_mbv2}}\n"
                   "network_slimming: {enabled: false}\n")
    m = run_train(cfg, tmp_path / "small", "train.epochs=4")
    assert abs(m["realised_cost"] - m["planned_cost"]) <= 0.03 * m["planned_cost"]


def test_warming_up_shapes_leaves_weights_gradients_and_batchnorm_statistics_alone():
    """The per-shape warm-up (run on CUDA before each new shape) computes, then restores."""
    from dance.engine.train import warm_shapes
    model = dance.build_model("deeplabv3plus_mbv2", 5, width_mult=0.35, aspp_channels=16)
    model.train()
    model(torch.rand(2, 3, 64, 64)).mean().backward()  # a held gradient must survive as it is
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    warm_shapes(model, [(2, 3, 32, 64), (2, 3, 48, 96)], torch.device("cpu"), amp=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    now = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert now.keys() == grads.keys() and all(torch.equal(now[n], g) for n, g in grads.items())


def test_a_run_keeps_a_plain_text_log_with_one_line_per_epoch(runs):
    base, plain, _ = runs
    lines = (base / "plain" / "train.log").read_text().splitlines()
    assert len(lines) == 3 and "\r" not in "".join(lines)
    assert " epoch 1/2  step " in lines[0] and " epoch 2/2 " in lines[1]
    assert "loss " in lines[0] and "realised cost " in lines[1]
    assert lines[2].endswith(f"finished: mIoU {plain['miou']:.2f}, training FLOPs "
                             f"1.000 of the plain run's, {plain['train_seconds']:.1f} s")
    # a slimmed network: the training FLOPs count its cheaper steps; the data plan's cost, on
    # the network the run started with, is said apart (it was logged as the FLOPs before)
    last = (base / "dance" / "train.log").read_text().splitlines()[-1]
    m = json.loads((base / "dance" / "metrics.json").read_text())
    assert f"training FLOPs {m['total_cost']:.3f} of the plain run's (data plan " \
        f"{m['realised_cost']:.3f} on the original network)" in last


def test_predict_writes_label_pngs_and_overlays_for_a_folder(runs, synth, tmp_path, capsys):
    from PIL import Image

    from dance.data.io import read_image
    base, _, _ = runs
    images = synth / "leftImg8bit" / "val"
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(base / "dance"), "--images", str(images),
                 "--out", str(out), "--quiet"]) == 0
    assert "segmented 6 images" in capsys.readouterr().out
    first = sorted(images.rglob("*.png"))[0]
    rel = first.relative_to(images).with_suffix("")
    labels = np.asarray(Image.open(out / f"{rel}.png"))
    image = read_image(first)
    model = dance.load_model(base / "dance")
    with torch.no_grad():
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
        expected = model(x).argmax(1)[0].numpy()
    assert labels.dtype == np.uint8 and (labels == expected).all()
    overlay = np.asarray(Image.open(out / f"{rel}_overlay.png"))
    assert overlay.shape[1:] == image.shape[1:] and overlay.shape[0] > image.shape[0]  # legend
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    rc = main(["predict", "--checkpoint", str(base / "dance"), "--images", str(tmp_path / "bad"),
               "--out", str(tmp_path / "p2"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and str(tmp_path / "bad" / "x.png") in err[0]


def test_validating_during_training_keeps_the_best_model(config, synth, tmp_path, capsys):
    out = tmp_path / "val"
    m = run_train(config, out, "data_slimming.enabled=false", "network_slimming.enabled=false",
                  "train.eval_every=1", "train.epochs=3")
    vals = [m["history"][0]["val_miou"], m["history"][1]["val_miou"], m["miou"]]
    assert m["history"][2]["val_miou"] is None  # the last epoch is measured once, at the end
    assert m["best"]["val_miou"] == max(vals) and m["best"]["path"] == "best"
    assert m["best"]["epoch"] == 3 - vals[::-1].index(max(vals))  # ties: the later epoch
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "best"), "--dataset", "synth",
                 "--root", str(synth), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["miou"] == pytest.approx(max(vals), abs=1e-6)
    assert set(p.name for p in (out / "best").iterdir()) == {
        "model.safetensors", "trainer.safetensors", "state.json"}
    # without validation during training there is no best/ and metrics say so
    m2 = run_train(config, tmp_path / "noval", "data_slimming.enabled=false",
                   "network_slimming.enabled=false", "train.epochs=1")
    assert m2["best"] is None and not (tmp_path / "noval" / "best").exists()


def test_a_stretched_run_trains_longer_at_the_same_training_flops(runs, config, tmp_path):
    """data_slimming.stretch=2: twice the epochs, each at half the budget's cost; the training
    FLOPs, and the costs metrics.json reports, stay priced against the plain run of the recipe."""
    from dance.engine.config import load_config
    from dance.engine.train import stretched
    _, plain, _ = runs
    cfg = load_config(config, [*TINY, "data_slimming.stretch=2"])
    longer, epochs = stretched(cfg)
    assert (longer.train.epochs, epochs, longer.data_slimming.budget) == (4, 2, 0.25)
    assert longer.network_slimming.network_budget == cfg.network_slimming.network_budget
    off = load_config(config, [*TINY, "data_slimming.stretch=2", "data_slimming.enabled=false"])
    assert stretched(off) == (off, 2)  # a plain run is never stretched
    m = run_train(config, tmp_path / "stretch", "data_slimming.policy=uniform",
                  "network_slimming.enabled=false", "data_slimming.stretch=2")
    assert m["trained_epochs"] > 3  # about 4 epochs, trimmed to the budget
    total = m["train_gflops_total"] / plain["train_gflops_total"]
    assert abs(total - 0.5) <= 0.03, total
    assert m["total_cost"] == pytest.approx(total, rel=0.01)
    assert m["planned_cost"] == pytest.approx(0.5, abs=0.03)
    assert m["cost_note"] is None


def test_cpu_training_steps_take_the_small_map_shortcuts(config, tmp_path, monkeypatch):
    """Every CPU training step runs its forward inside ``small_map_convs`` (default on, before and
    after a channel removal), which hands the layers back as ``nn.Conv2d`` after each step;
    ``train.small_map_convs=false`` turns it off."""
    import dance.engine.train as engine
    real = engine.small_map_convs
    for option, expected in (((), True), (("train.small_map_convs=false",), False)):
        seen = []

        def spy(model, enabled=True, seen=seen):
            seen.append((enabled, len(model.dance_arch.removed)))
            return real(model, enabled)
        monkeypatch.setattr(engine, "small_map_convs", spy)
        out = tmp_path / str(expected)
        m = run_train(config, out, *option)
        assert {enabled for enabled, _ in seen} == {expected}
        if expected:
            assert len({removed for _, removed in seen}) > 1  # before and after the removal
            assert m["removed_channels"] > 0


def test_probe_loss_chooses_what_importance_is_measured_on(runs, config, tmp_path, monkeypatch):
    """network_slimming.probe_loss: the default measures the pixel-mean loss; class_balanced
    measures branches and channels on the mean of the classes' mean losses."""
    import dance.engine.train as train_mod
    _, _, default = runs
    calls = []
    real = train_mod.class_balanced_cross_entropy

    def spy(logits, masks):
        calls.append(tuple(logits.shape))
        return real(logits, masks)

    monkeypatch.setattr(train_mod, "class_balanced_cross_entropy", spy)
    balanced = run_train(config, tmp_path / "balanced", "network_slimming.probe_loss=class_balanced")
    assert calls and balanced["prune_events"]
    assert balanced["fingerprint"]["config"]["network_slimming"]["probe_loss"] == "class_balanced"
    assert "probe_loss" not in default["fingerprint"]["config"]["network_slimming"]
    # the same model at the same point measured on another loss
    assert balanced["prune_events"][0]["probe_loss"] != default["prune_events"][0]["probe_loss"]
