"""`dance bench`: every subcommand on tiny SynthStreets sets, through the CLI."""
from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

from dance.cli import main
from dance.data.plan import DEFAULT_SCALE_SET
from dance.data.transforms import scaled_crop

TINY = ["--size", "64x128"]
TINY_MODEL = '{"width_mult": 0.25, "aspp_channels": 16}'


def run_json(capsys, *argv: str) -> dict:
    assert main(["bench", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows of ``text`` by their first cell."""
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    return {r[0]: r[1:] for r in rows}


def assert_machine(m: dict, device: str = "cpu") -> None:
    assert m["cpu_count"] == len(os.sched_getaffinity(0))
    assert m["torch"] == torch.__version__
    assert m["device"] == device and "cuda_device" not in m
    assert m["load_average_start"] >= 0 and m["load_average_end"] >= 0


def test_pipeline_measures_every_scale_against_full_scale(capsys, tmp_path):
    crop = (64, 128)
    r = run_json(capsys, "pipeline", "--n", "8", *TINY, "--crop", "64x128", "--workers", "1",
                 "--batch", "4", "--repeats", "1", "--data", str(tmp_path / "synth"))
    assert_machine(r["machine"])
    keys = [repr(s) for s in DEFAULT_SCALE_SET]
    assert list(r["images_per_second"]) == keys
    assert r["ratio_vs_full_scale"]["1.0"] == 1.0
    for s, k in zip(DEFAULT_SCALE_SET, keys):
        assert r["images_per_second"][k] > 0
        # the batches really came out at the plan's scale, through one persistent worker
        h, w = scaled_crop(crop, s)
        assert r["output_size"][k] == [h, w]
        assert r["pixels_vs_full_scale"][k] == pytest.approx(h * w / (64 * 128))
        assert r["ratio_vs_full_scale"][k] == pytest.approx(
            r["images_per_second"][k] / r["images_per_second"]["1.0"])
    assert r["decode_only_images_per_second"] > 0
    assert r["setup"]["images"] == 8 and r["setup"]["workers"] == 1


def test_pipeline_through_the_decode_cache_keeps_the_labels(capsys, tmp_path):
    r = run_json(capsys, "pipeline", "--n", "4", *TINY, "--crop", "64x128", "--workers", "1",
                 "--batch", "2", "--repeats", "1", "--data", str(tmp_path / "synth"),
                 "--decode-cache")
    assert r["setup"]["decode_cache"] is True and r["labels_identical_to_full_decode"] is True
    entries = sorted(p.name.split(".")[1] for p in (tmp_path / "synth").rglob("*.npy"))
    assert entries == sorted(["img1", "img2", "img4", "mask"] * 4)  # every image, three levels
    assert all(v > 0 for v in r["images_per_second"].values())


def test_complexity_prints_throughput_and_correlation_tables(capsys, tmp_path):
    assert main(["bench", "complexity", "--n", "8", *TINY, "--workers", "1", "--repeats", "1",
                 "--data", str(tmp_path / "synth")]) == 0
    out = capsys.readouterr().out
    assert "Machine:" in out and f"torch {torch.__version__}" in out
    rows = table_rows(out)
    assert rows["decode only"][1] == "1.00×"
    for run in ("decode only", "score si", "score 5 image indicators",
                "score all 7 (+ mask decode)"):
        assert float(rows[run][0]) > 0
    for indicator in ("si", "gradient", "edges", "entropy", "jpeg"):
        assert -1 <= float(rows[indicator][0]) <= 1


def test_models_before_and_after_removing_the_largest_branch(capsys):
    r = run_json(capsys, "models", *TINY, "--models", "lraspp_mobilenet_v3_large", "--runs", "1")
    assert_machine(r["machine"])
    (m,) = r["models"]
    assert m["model"] == "lraspp_mobilenet_v3_large" and m["removed"] == ["lraspp.context"]
    for key in ("params_m", "gflops", "latency_ms"):
        assert m["before"][key] > 0 and m["after"][key] > 0
        assert m["ratios"][key] == pytest.approx(m["after"][key] / m["before"][key])
    assert m["after"]["gflops"] < m["before"]["gflops"]
    assert m["after"]["params_m"] < m["before"]["params_m"]


def test_models_slimmed_to_a_network_budget(capsys):
    r = run_json(capsys, "models", *TINY, "--models", "pspnet_r18", "--runs", "1",
                 "--network-budget", "0.5")
    (m,) = r["models"]
    assert r["setup"]["network_budget"] == 0.5
    assert any(x.endswith(" channels") for x in m["removed"])
    assert m["ratios"]["gflops"] == pytest.approx(0.5, abs=0.05)
    assert m["after"]["params_m"] < m["before"]["params_m"]


def test_models_timed_as_exported_onnx_files_in_onnxruntime(capsys, monkeypatch):
    # a channel-slimmed model, exported and run the way a deployment runs it
    r = run_json(capsys, "models", *TINY, "--models", "pspnet_r18", "--runs", "2",
                 "--network-budget", "0.5", "--runtime", "onnxruntime")
    (m,) = r["models"]
    assert r["setup"]["runtime"] == "onnxruntime"
    assert m["before"]["latency_ms"] > 0 and m["after"]["latency_ms"] > 0
    assert m["ratios"]["gflops"] == pytest.approx(0.5, abs=0.05)
    assert main(["bench", "models", *TINY, "--models", "pspnet_r18", "--runs", "1",
                 "--runtime", "onnxruntime"]) == 0
    assert "onnxruntime (the exported ONNX files" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed
    assert main(["bench", "models", *TINY, "--models", "pspnet_r18", "--runs", "1",
                 "--runtime", "onnxruntime"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "dance bench: error: --runtime onnxruntime needs onnxruntime: pip install onnxruntime")


def test_gpu_train_script_dry_run_on_the_cpu_gives_every_ratio(capsys, monkeypatch, tmp_path):
    """benchmarks/gpu_train.py --device cpu --tiny: the GPU benchmark's whole path on a CPU."""
    # 16 images: with 8, five scale buckets of one or two images each are padded to whole
    # batches, and the run (rightly) warns that it spent 0.84 of the plain run for a plan of 0.5
    out = tmp_path / "bench"
    assert run_script(monkeypatch, "--device", "cpu", "--tiny", "--model-options", TINY_MODEL,
                      "--out", str(out), "--json") == 0
    r = json.loads(capsys.readouterr().out)
    assert_machine(r["machine"])
    assert r["setup"]["model"] == "deeplabv3plus_mbv2" and r["setup"]["size"] == [64, 128]
    plain, dance, q = r["plain"], r["dance"], r["ratios"]
    for key in ("images_per_second", "train_seconds", "train_gflops_total", "energy_joules"):
        assert plain[key] > 0 and dance[key] > 0
    assert q["train_gflops"] == pytest.approx(dance["train_gflops_total"]
                                              / plain["train_gflops_total"])
    assert q["images_per_second"] == pytest.approx(dance["images_per_second"]
                                                   / plain["images_per_second"])
    assert q["miou_delta"] == pytest.approx(dance["miou"] - plain["miou"])
    assert plain["planned_cost"] == 1.0 and dance["planned_cost"] == pytest.approx(0.5, abs=0.01)
    assert q["train_gflops"] < 0.8  # data slimming at budget 0.5 spent fewer training FLOPs
    assert json.loads((out / "results.json").read_text()) == r
    # where a step's time went, and the step time at each input shape
    for m in (plain, dance):
        assert {"data", "forward", "backward", "optimizer", "accounting"} <= set(m["phase_seconds"])
        steps = m["step_seconds_by_shape"]
        assert sum(v["steps"] for v in steps.values()) > 0
        assert all(v["ms_per_step"] > 0 for v in steps.values())
    assert list(plain["step_seconds_by_shape"]) == ["64x128"]
    assert "64x128" not in dance["step_seconds_by_shape"]  # one epoch at the plan's one scale
    assert "prune" in dance["phase_seconds"]


def test_train_defaults_to_the_demos_small_model_options():
    from dance.bench.train import default_model_options
    from dance.report.demo import DEMO_CONFIG
    assert default_model_options("deeplabv3plus_mbv2") == DEMO_CONFIG["model"]["options"] == {
        "width_mult": 0.5, "aspp_channels": 64, "decoder_channels": 64}
    assert default_model_options("pspnet_r18") == {}


@pytest.mark.parametrize("argv, says", [
    (["pipeline", "--size", "64by128"], "pipeline: argument --size: size must look like"),
    (["pipeline", "--n", "1"], "pipeline: argument --n: must be >= 2, got 1"),
    (["train", "--device", "gpu"], "expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["train", "--model-options", "width=1"], "expected a JSON object"),
    (["train", "--budget", "1.5"], "budget"),
    (["models", "--models", "resnet9000", "--runs", "0"], "unknown model 'resnet9000'"),
    (["models", "--runtime", "tensorrt"], "invalid choice: 'tensorrt'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "required: SUBCOMMAND"),
])
def test_bad_values_are_one_line_errors(capsys, argv, says):
    assert main(["bench", *argv]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.startswith("dance bench: error: ") and says in err and "\n" not in err


def test_help_of_bench_and_of_a_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    assert "pipeline" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["bench", "pipeline", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--crop" in out and "--workers" in out and "--json" in out


GPU_SCRIPT = str(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_train.py")


def run_script(monkeypatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", [GPU_SCRIPT, *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(GPU_SCRIPT, run_name="__main__")
    return e.value.code


def test_gpu_train_script_keeps_its_flags_and_defaults(capsys, monkeypatch):
    assert run_script(monkeypatch, "--help") == 0
    out = capsys.readouterr().out
    for flag in ("--out", "--model", "--size", "--train", "--val", "--epochs", "--batch",
                 "--workers", "--device"):
        assert flag in out
    # its GPU-sized defaults come first, so a flag given to the script wins
    assert run_script(monkeypatch, "--epochs", "0") == 1
    assert capsys.readouterr().err.strip() == (
        "dance bench: error: train: argument --epochs: must be >= 1, got 0")


def test_spearman_matches_scipy_without_needing_it():
    import numpy as np
    from scipy.stats import spearmanr

    from dance.bench.complexity import spearman
    rng = np.random.default_rng(0)
    a = rng.random(200)
    b = a + rng.normal(0, 0.3, 200)
    b[:20] = b[0]  # ties
    rho, p = spearman(a, b)
    ref = spearmanr(a, b)
    assert rho == pytest.approx(ref.statistic, abs=1e-12)
    assert p < 1e-10 and ref.pvalue < 1e-10
    assert np.isnan(spearman(a, np.ones(200))[0])


@pytest.mark.slow
def test_threads_compares_thread_counts_and_runs_side_by_side(capsys, tmp_path):
    import torch

    from dance.parallel import usable_cores
    r = run_json(capsys, "threads", "--size", "64x128", "--train", "8", "--epochs", "1",
                 "--batch", "4", "--workers", "0", "--model-options", TINY_MODEL,
                 "--data", str(tmp_path / "data"))
    assert_machine(r["machine"])
    rows = r["rows"]
    cores = usable_cores()
    assert [row["threads"] for row in rows if row["runs"] == 1][0] == 1
    assert [row["threads"] for row in rows if row["runs"] == 1][-1] == cores
    assert all(row["images_per_second"] > 0 for row in rows)
    ref = next(row for row in rows if row["runs"] == 1
               and row["threads"] == r["setup"]["default_threads"])
    assert ref["ratio"] == pytest.approx(1.0)
    if cores > 1:
        assert rows[-1]["runs"] == cores and rows[-1]["threads"] == 1
    assert torch.get_num_threads() == r["setup"]["default_threads"]  # left as it was


@pytest.mark.slow
def test_converged_script_dry_run_takes_the_whole_path_on_the_cpu(tmp_path, capsys):
    """benchmarks/converged.py runs the converged claim on 2 cores or a GPU; --dry-run checks
    its whole path here."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "converged.py"
    mod = runpy.run_path(str(script))
    out = tmp_path / "conv"
    assert mod["run"](["--dry-run", "--jobs", "2", "--out", str(out)]) == 0
    recipe = (out / "recipe.yaml").read_text()
    assert "cityscapes_categories" in recipe and "- 32\n  - 64" in recipe
    sat = json.loads((out / "saturation" / "saturation.json").read_text())
    assert [r["epochs"] for r in sat["rows"]] == [1, 2, 4]
    report = json.loads((out / "compare" / "report.json").read_text())
    # the trained runs, then lowres: compare adds it (the baseline evaluated at a lower input
    # resolution) whenever dance slims the network towards a budget
    assert list(report["runs"]) == mod["RUNS"].split(",") + ["lowres"]
    assert "DANCE vs progressive" in capsys.readouterr().out


@pytest.mark.slow
def test_phases_script_prints_every_runs_phases_and_ratios(tmp_path, capsys):
    from dance.data.synth import generate_synthstreets
    from tiny import TINY  # the tiny recipe of test_train
    root = tmp_path / "synth"
    generate_synthstreets(root, train=16, val=2, size=(64, 128), seed=0, progress=False)
    mod = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "phases.py"))
    out = tmp_path / "phases"
    assert mod["main"](["--data", str(root), "--runs", "baseline,uniform", "--out", str(out),
                        *TINY, "train.workers=0"]) == 0
    text = capsys.readouterr().out
    assert "| baseline |" in text and "| uniform |" in text and "64x128" in text
    saved = json.loads((out / "phases.json").read_text())
    assert saved["baseline"]["total_cost"] == 1.0
    assert saved["uniform"]["total_cost"] == pytest.approx(0.5, abs=0.03)
    assert {"forward", "backward", "optimizer"} <= set(saved["uniform"]["phase_seconds"])


def test_dead_channels_script_counts_channels_that_no_longer_fire(tmp_path, capsys):
    """benchmarks/dead_channels.py counts the removable groups' channels with zero Taylor
    importance: switching some off (BatchNorm scale and shift 0) adds those, and perhaps channels
    downstream of them that stop firing with them (two more under torch 2.3)."""
    from dance.data.synth import generate_synthstreets
    from dance.engine.checkpoint import load_model
    from dance.engine.config import load_config
    from dance.engine.train import train
    from dance.network.channels import channel_groups
    from tiny import TINY
    root = tmp_path / "synth"
    generate_synthstreets(root, train=8, val=2, size=(64, 128), seed=0, progress=False)
    run = tmp_path / "compare" / "runs" / "baseline-seed0"
    cfg = load_config(None, [f"dataset.root={root}", "data_slimming.enabled=false",
                             "network_slimming.enabled=false", *TINY, "train.epochs=1"])
    train(cfg, run, progress=False)
    mod = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks"
                             / "dead_channels.py"))
    total, dead = mod["dead_channels"](run, 4, 0)
    assert mod["main"]([str(tmp_path / "compare"), "--images", "4"]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:3] == ["baseline-seed0", str(total), str(dead)]
    model = load_model(run)
    assert total == sum(g.channels for g in channel_groups(model, (1, 3, 64, 128)))
    x = torch.rand(4, 3, 64, 128)
    y = torch.randint(0, 5, (4, 64, 128))
    before = mod["count_dead"](model, [(x, y)], (64, 128))
    with torch.no_grad():
        for g in [g for g in channel_groups(model, (1, 3, 64, 128)) if g.bns][:2]:
            for bn in g.bns:
                model.get_submodule(bn).weight[-3:] = 0.0
                model.get_submodule(bn).bias[-3:] = 0.0
    after = mod["count_dead"](model, [(x, y)], (64, 128))
    assert after[0] == before[0] and before[1] + 6 <= after[1] <= before[1] + 6 + 16
    assert all(p.grad is None for p in model.parameters())


def test_benchmark_data_lives_in_this_users_private_cache_not_in_tmp(tmp_path, monkeypatch):
    from dance.bench import common
    from dance.errors import DanceError
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = common.synth_root(None, 8, 2, (32, 64))
    assert root == tmp_path / "cache" / "dance" / "bench-synth-8-2-32x64"
    assert (os.stat(tmp_path / "cache" / "dance").st_mode & 0o777) == 0o700
    # a folder someone else prepared: a symlink, or writable by others, or not ours
    for case in ("symlink", "mode", "owner"):
        base = tmp_path / case
        base.mkdir()
        monkeypatch.setenv("XDG_CACHE_HOME", str(base))
        if case == "symlink":
            (tmp_path / "elsewhere").mkdir(exist_ok=True)
            (base / "dance").symlink_to(tmp_path / "elsewhere")
        else:
            (base / "dance").mkdir()
            if case == "mode":
                os.chmod(base / "dance", 0o777)
            elif os.getuid() == 0:
                os.chown(base / "dance", 12345, 12345)
            else:
                continue
        with pytest.raises(DanceError, match="pass --data FOLDER"):
            common.synth_root(None, 8, 2, (32, 64))


def test_layout_script_times_both_layouts_of_each_model(capsys):
    """benchmarks/layout.py prints one row per model and size: both layouts' (or the usual and
    the small-map convolutions') step times and their ratio; a bad size or model is a one-line
    usage error."""
    mod = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "layout.py"))
    assert mod["main"](["--models", "lraspp_mobilenet_v3_large", "--sizes", "32x64",
                        "--batch", "1", "--steps", "1", "--repeats", "1"]) == 0
    rows = table_rows(capsys.readouterr().out)
    usual, last, ratio = (float(v) for v in rows["lraspp_mobilenet_v3_large"][0].split(","))
    assert usual > 0 and last > 0 and ratio == pytest.approx(last / usual, rel=0.01)  # ms rounded
    assert mod["main"](["--models", "deeplabv3plus_mbv2", "--sizes", "32x64", "--batch", "2",
                        "--steps", "1", "--repeats", "1", "--against", "small-maps"]) == 0
    out = capsys.readouterr().out
    assert "usual ms, small-maps ms, ratio" in out
    usual, small, ratio = (float(v) for v in table_rows(out)["deeplabv3plus_mbv2"][0].split(","))
    assert usual > 0 and small > 0 and ratio == pytest.approx(small / usual, rel=0.01)
    for bad in (["--sizes", "64by128"], ["--models", "unet"]):
        with pytest.raises(SystemExit):
            mod["main"](bad)
        err = capsys.readouterr().err
        assert "64by128" in err or "unet" in err
