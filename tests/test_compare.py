"""`dance compare` on tiny SynthStreets: every run kind, the report files, the ratios, seeds."""
import json
import shutil
from pathlib import Path

import pytest

from dance.cli import main
from dance.errors import DanceError
from dance.network.registry import thin_options
from dance.report.compare import RUN_KINDS, aggregate, parse_runs, run_config, thin_model
from tiny import TINY, tiny_synth


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tiny_synth(tmp_path_factory, train=48, val=4, seed=2)
    cfg = tmp_path_factory.mktemp("cfg") / "c.yaml"
    cfg.write_text(f"dataset: {{name: synth, root: {root}}}\n"
                   "model: {name: deeplabv3plus_mbv2}\n"
                   "network_slimming: {prune_at: [0.5], network_budget: 0.9}\n")
    out = tmp_path_factory.mktemp("compare")
    rc = main(["compare", "--config", str(cfg), *TINY, "--runs", ",".join(RUN_KINDS),
               "--out", str(out), "--quiet", "--jobs", "2"])
    assert rc == 0
    return out, root


def test_every_run_kind_and_the_report(compared):
    out, _ = compared
    report = json.loads((out / "report.json").read_text())
    # lowres: the baseline models evaluated at a lower resolution, added with a network budget
    assert list(report["runs"]) == [*RUN_KINDS, "lowres"]
    base = report["runs"]["baseline"]
    for kind, r in report["runs"].items():
        q = report["ratios"][kind]
        assert set(q) >= {"train_gflops", "infer_gflops", "train_seconds", "energy_joules",
                          "miou_delta"}
        assert q["train_gflops"] == pytest.approx(r["train_gflops_total"]
                                                  / base["train_gflops_total"])
        assert q["miou_delta"] == pytest.approx(r["miou"] - base["miou"])
        assert (out / "runs" / (kind if kind != "lowres" else "baseline")
                / "metrics.json").is_file()
    # equal-budget runs spend about half the plain run's training FLOPs
    for kind in ("uniform", "progressive", "shuffled", "data", "dance"):
        assert 0.4 < report["ratios"][kind]["train_gflops"] < 0.62, kind
    # the shuffled control spends its plan's cost without the guidance
    assert report["runs"]["shuffled"]["planned_cost"] == pytest.approx(0.5, abs=0.01)
    # only runs with network slimming lose branches, and their deployed model is smaller
    for kind in ("network", "dance"):
        assert report["runs"][kind]["removed_branches"]
        assert report["ratios"][kind]["infer_gflops"] < 1.0
        assert report["runs"][kind]["removed_channels"] > 0  # the budget is met by channels too
    for kind in ("baseline", "uniform", "progressive", "shuffled", "data", "thin"):
        assert report["runs"][kind]["removed_branches"] == []
        assert report["runs"][kind]["removed_channels"] == 0
    # the alternatives for a smaller model match DANCE's inference FLOPs, not its training
    assert report["ratios"]["thin"]["infer_gflops"] == pytest.approx(0.9, abs=0.02)
    lowres = report["runs"]["lowres"]
    assert report["ratios"]["lowres"]["infer_gflops"] == pytest.approx(
        report["ratios"]["dance"]["infer_gflops"], rel=0.05)
    assert 0.5 < lowres["input_scale"] < 1 and report["ratios"]["lowres"]["train_gflops"] == 1
    md = (out / "report.md").read_text()
    assert "| dance |" in md and "Branch importance" in md and "Channel groups removed" in md
    assert "evaluated at input scale" in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"complexity_plan.png", "scale_distribution.png", "gates.png", "cost_vs_miou.png",
            "predictions.png", "miou_vs_flops.png", "inference_pareto.png"} <= set(pngs)
    assert all((out / p).stat().st_size > 5000 for p in pngs)  # real pictures, not empty axes
    curve = report["runs"]["dance"]["miou_flops_curve"]
    assert {c["name"] for c in curve} >= {"adaptive"}


def test_adaptive_resolution_eval(compared, capsys):
    out, root = compared
    rc = main(["eval", "--checkpoint", str(out / "runs" / "dance"), "--dataset", "synth",
               "--root", str(root), "--adaptive-resolution", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0
    ar = res["adaptive_resolution"]
    assert 0 < ar["mean_gflops"] <= res["gflops"] + 1e-9
    assert sum(ar["scales"].values()) == 4
    # a plain run has no complexity scores to pick a resolution from: one-line error
    rc = main(["eval", "--checkpoint", str(out / "runs" / "baseline"), "--dataset", "synth",
               "--root", str(root), "--adaptive-resolution"])
    assert rc == 1 and "no training complexity scores" in capsys.readouterr().err


def test_a_finished_compare_is_reused_not_retrained(compared, capsys):
    out, _ = compared
    cfg = json.loads((out / "report.json").read_text())["config"]
    before = (out / "runs" / "dance" / "metrics.json").stat().st_mtime_ns
    from dance.engine.config import config_from_dict
    from dance.report.compare import compare
    report = compare(config_from_dict(cfg), ["baseline", "dance"], out, progress=False,
                     plots=False)
    assert (out / "runs" / "dance" / "metrics.json").stat().st_mtime_ns == before
    assert set(report["runs"]) == {"baseline", "dance", "lowres"}  # lowres: evaluated only


def test_seeds_mark_differences_within_noise():
    def m(miou):
        return {"miou": miou, "train_gflops_total": 10.0, "gflops": 1.0, "train_seconds": 5.0,
                "energy_joules": 2.0}
    rep = aggregate({"baseline": [m(50.0), m(52.0), m(54.0)],
                     "dance": [m(51.0), m(53.0), m(55.0)],
                     "uniform": [m(40.0), m(40.5), m(41.0)]})
    assert rep["runs"]["baseline"]["miou"] == pytest.approx(52.0)
    assert rep["runs"]["baseline"]["miou_std"] == pytest.approx(2.0)
    assert rep["ratios"]["dance"]["miou_delta"] == pytest.approx(1.0)
    assert rep["ratios"]["dance"]["within_noise"] is True  # 1 point < 2 points of spread
    assert rep["ratios"]["uniform"]["within_noise"] is False  # 11.75 points > spread


def test_run_kinds_and_bad_input():
    assert parse_runs("dance,uniform") == ["baseline", "dance", "uniform"]
    with pytest.raises(DanceError, match="unknown run kind"):
        parse_runs("dance,fancy")
    from dance.engine.config import RunConfig
    cfg = run_config(RunConfig(), "shuffled", seed=3)
    assert cfg.train.seed == 3 and cfg.data_slimming.policy == "shuffled"
    assert not cfg.network_slimming.enabled
    cfg = run_config(RunConfig(), "network", seed=0)
    assert not cfg.data_slimming.enabled and cfg.network_slimming.enabled
    cfg = run_config(RunConfig(), "thin", seed=0, thin={"aspp_channels": 31})
    assert cfg.model.options == {"aspp_channels": 31}
    assert not cfg.data_slimming.enabled and not cfg.network_slimming.enabled
    stretched = RunConfig.model_validate({"data_slimming": {"stretch": 1.5}})
    assert run_config(stretched, "dance", seed=0).data_slimming.stretch == 1.5
    for kind in ("uniform", "progressive", "shuffled", "data"):  # the recipe's epochs
        assert run_config(stretched, kind, seed=0).data_slimming.stretch == 1.0
    from dance.report.compare import _stretch_note
    assert _stretch_note(stretched.to_dict()).startswith(" (dance stretched to 6 epochs")  # 4 x 1.5
    assert _stretch_note(RunConfig().to_dict()) == ""
    with pytest.raises(DanceError, match="network_budget, which is not set"):
        thin_model(RunConfig())
    with pytest.raises(DanceError, match="has no head-width options"):
        thin_options("lraspp_mobilenet_v3_large", 5, {}, 0.5, (1, 3, 64, 64))


def test_thin_options_scale_the_head_to_the_budget():
    import dance
    shape = (1, 3, 64, 128)
    opts = {"width_mult": 0.5, "aspp_channels": 64, "decoder_channels": 64}
    thin = thin_options("deeplabv3plus_mbv2", 5, opts, 0.5, shape)
    assert thin["width_mult"] == 0.5 and thin["aspp_channels"] == thin["decoder_channels"] < 64
    ratio = (dance.count_gflops(dance.build_model("deeplabv3plus_mbv2", 5, **thin), shape)
             / dance.count_gflops(dance.build_model("deeplabv3plus_mbv2", 5, **opts), shape))
    assert ratio == pytest.approx(0.5, abs=0.02)


def test_short_runs_fewer_steps_with_the_schedule_compressed(compared):
    out, _ = compared
    base, short = (json.loads((out / "runs" / k / "metrics.json").read_text())
                   for k in ("baseline", "short"))
    budget = short["fingerprint"]["config"]["train"]["steps_fraction"]
    assert budget == 0.5  # the compare's budget (the default)
    assert short["history"][-1]["step"] == pytest.approx(budget * base["history"][-1]["step"],
                                                          abs=1)
    assert short["planned_cost"] == pytest.approx(budget)
    assert abs(short["realised_cost"] - budget) <= 0.03 * budget
    assert short["train_gflops_total"] / base["train_gflops_total"] == pytest.approx(budget,
                                                                                     rel=0.03)
    # its learning rate decays to (almost) zero within the shorter run, as the plain run's does
    assert short["history"][-1]["lr"] < 0.2 * short["fingerprint"]["config"]["train"]["lr"]


def test_verdicts_say_whether_dance_beat_each_alternative_beyond_the_spread():
    from dance.report.compare import verdicts

    def run(miou, std, seeds=3):
        return {"miou": miou, "miou_std": std, "seeds": seeds}
    report = {"runs": {"baseline": run(30, 0.5), "short": run(26, 0.4), "uniform": run(29.0, 0.3),
                       "dance": run(29.2, 0.2)},
              "ratios": {k: {"train_gflops": 1.0 if k == "baseline" else 0.5}
                         for k in ("baseline", "short", "uniform", "dance")}}
    lines = verdicts(report)
    assert lines[0].startswith("DANCE vs baseline: -0.80 mIoU at 0.50× vs 1.00×")
    assert lines[0].endswith("lost to it beyond the seed spread (±0.50)")
    assert lines[1].endswith("beat it beyond the seed spread (±0.40)")
    assert lines[2].endswith("within the seed spread (±0.30)")
    report["runs"]["dance"]["seeds"] = 1
    assert all("one seed" in line for line in verdicts(report))


@pytest.mark.slow  # the converged script's dry run (slow) takes this path too
def test_saturation_trains_the_plain_recipe_at_half_once_and_twice_its_epochs(compared, capsys):
    out, root = compared
    cfg = json.loads((out / "runs" / "baseline" / "metrics.json").read_text())["fingerprint"]
    # one thread, as the fixture's --jobs 2 trained its baseline (threads change float sums)
    cfg = {**cfg["config"], "train": {**cfg["config"]["train"], "workers": 0, "threads": 1}}
    import yaml
    f = out.parent / "sat.yaml"
    f.write_text(yaml.safe_dump(cfg))
    sat = out.parent / "sat"
    assert main(["compare", "--config", str(f), "--saturation", "--out", str(sat), "--quiet"]) == 0
    text = capsys.readouterr().out
    result = json.loads((sat / "saturation.json").read_text())
    assert [r["epochs"] for r in result["rows"]] == [1, 2, 4]
    assert result["gain_2x"] == pytest.approx(result["rows"][2]["miou"] - result["rows"][1]["miou"])
    assert result["converged"] == (result["gain_2x"] < 1.0)
    assert "Twice the epochs gains" in text
    # the 1x run is the compare's own plain recipe: same fingerprint as its baseline
    base = json.loads((out / "runs" / "baseline" / "metrics.json").read_text())
    assert result["rows"][1]["miou"] == pytest.approx(base["miou"], abs=1e-6)


def test_jobs_train_runs_side_by_side_with_the_same_results(compared, capsys):
    """--jobs 2 trains two runs at a time in their own processes; with the same thread count
    each run's result is the same as when trained one at a time, and the report is the same."""
    _, root = compared
    cfg = root.parent / "jobs.yaml"
    cfg.write_text(f"dataset: {{name: synth, root: {root}}}\n"
                   "model: {name: deeplabv3plus_mbv2}\n"
                   "train: {threads: 1, workers: 0}\n")
    args = ["compare", "--config", str(cfg), *TINY, "train.epochs=1", "--runs",
            "baseline,dance", "--quiet"]
    one, two = root.parent / "one", root.parent / "two"
    import torch
    threads = torch.get_num_threads()
    assert main([*args, "--out", str(one)]) == 0
    assert torch.get_num_threads() == threads  # train.threads holds for the run only
    assert main([*args, "--out", str(two), "--jobs", "2"]) == 0
    err = capsys.readouterr().err
    assert "2 runs, 2 at a time" in err
    a = json.loads((one / "report.json").read_text())
    b = json.loads((two / "report.json").read_text())
    for kind in ("baseline", "dance"):
        assert b["runs"][kind]["miou"] == a["runs"][kind]["miou"]
        assert b["runs"][kind]["train_gflops_total"] == a["runs"][kind]["train_gflops_total"]
    assert b["run_status"] == {"baseline": ["trained"], "dance": ["trained"]}
    # the scores were computed once, before the runs, into the compare's cache
    assert (two / "scores.cache.json").is_file()
    # run again: every run is reused, from the worker processes too
    assert main([*args, "--out", str(two), "--jobs", "2"]) == 0
    again = json.loads((two / "report.json").read_text())
    assert again["run_status"]["dance"] == ["reused"]
    capsys.readouterr()
    assert main([*args, "--out", str(two), "--jobs", "0"]) == 1
    assert capsys.readouterr().err.strip() == "dance compare: error: --jobs must be at least 1, got 0"


def test_bench_models_times_every_deployed_model_of_a_compare(compared, capsys, tmp_path,
                                                              monkeypatch):
    out, _ = compared
    assert main(["bench", "models", "--compare", str(out), "--runs", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    rows = {row["run"]: row for row in r["rows"]}
    # every run of the report (an earlier test may have rewritten it with fewer)
    report = json.loads((out / "report.json").read_text())
    assert list(rows) == list(report["run_dirs"]) and {"baseline", "dance", "lowres"} <= set(rows)
    assert rows["baseline"]["ratios"] == {"params_m": 1.0, "gflops": 1.0, "latency_ms": 1.0}
    assert rows["dance"]["gflops"] < rows["baseline"]["gflops"]
    assert rows["dance"]["params_m"] < rows["baseline"]["params_m"]
    assert rows["lowres"]["params_m"] == rows["baseline"]["params_m"]
    assert rows["lowres"]["input"][0] < rows["baseline"]["input"][0]
    assert all(row["latency_ms"] > 0 for row in rows.values())
    assert r["setup"]["seed"] == report["config"]["train"]["seed"]  # whose models were timed
    assert main(["bench", "models", "--compare", str(out), "--runs", "0"]) == 0
    assert f"(seed {r['setup']['seed']} of each run: its first)" in capsys.readouterr().out
    # a compare run as `--out cmp` names its runs cmp/runs/...: copied to another name and
    # opened from another directory, they are found under the folder's own runs/
    copy = tmp_path / "moved"
    shutil.copytree(out, copy)
    moved_report = json.loads((copy / "report.json").read_text())
    moved_report["run_dirs"] = {k: [f"cmp/runs/{Path(d).name}" for d in dirs]
                                for k, dirs in moved_report["run_dirs"].items()}
    (copy / "report.json").write_text(json.dumps(moved_report))
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "models", "--compare", "moved", "--runs", "0", "--json"]) == 0
    moved = {row["run"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    assert {k: r["gflops"] for k, r in moved.items()} == {k: r["gflops"] for k, r in rows.items()}
    # the deployed files: each run's model exported to ONNX, timed in onnxruntime
    assert main(["bench", "models", "--compare", "moved", "--runs", "1", "--runtime",
                 "onnxruntime", "--json"]) == 0
    ort_rows = json.loads(capsys.readouterr().out)["rows"]
    assert [row["run"] for row in ort_rows] == list(rows)
    assert all(row["latency_ms"] > 0 for row in ort_rows)
    assert main(["bench", "models", "--compare", str(out / "nope")]) == 1
    assert "report.json: not found" in capsys.readouterr().err


def test_runs_start_longest_first_and_dance_before_the_runs_at_its_budget():
    from dance.engine.config import load_config
    from dance.report.compare import RunJob, _expected_cost
    cfg = load_config("demo", [])
    cost = {k: _expected_cost(RunJob(run_config(cfg, k, 0), Path(k), k))
            for k in ("baseline", "short", "uniform", "dance")}
    assert cost["baseline"] > cost["dance"] > cost["uniform"] == cost["short"]
