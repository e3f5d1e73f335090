"""Configs: YAML with shared bases, dotted overrides, one-line errors naming the key."""
from pathlib import Path

import pytest

from dance.cli import main
from dance.engine.config import config_from_dict, load_config
from dance.errors import DanceError

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_ready_configs_all_load():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert len(files) == 19  # 4 datasets x 4 model families, SynthStreets, demo and converged
    for f in files:
        cfg = load_config(f)
        assert cfg.data_slimming.budget == 0.5
    cs = load_config(REPO / "configs" / "cityscapes_pspnet_r50.yaml")
    assert (cs.dataset.name, cs.model.name, tuple(cs.train.crop)) == \
        ("cityscapes", "pspnet_r50", (512, 1024))


def test_overrides_and_bases(tmp_path):
    write(tmp_path / "base.yaml", "train: {epochs: 9, batch_size: 2}\n")
    f = write(tmp_path / "c.yaml", "base: base.yaml\ntrain: {epochs: 3}\n")
    cfg = load_config(f, ["train.lr=0.5", "data_slimming.budget=0.4",
                          "network_slimming.prune_at=[0.2,0.6]"])
    assert cfg.train.epochs == 3 and cfg.train.batch_size == 2 and cfg.train.lr == 0.5
    assert cfg.data_slimming.budget == 0.4
    assert cfg.network_slimming.prune_at == [0.2, 0.6]
    assert cfg.network_slimming.lambda_ == 1e-4


@pytest.mark.parametrize("text, override, needle", [
    ("train: {epochss: 2}\n", [], "unknown key 'train.epochss'"),
    ("train: {epochs: 0}\n", [], "train.epochs"),
    ("data_slimming: {budget: 1.5}\n", [], "budget must be in (0, 1]"),
    ("model: {name: resnet9000}\n", [], "unknown model 'resnet9000'"),
    ("", ["train.batch_size=abc"], "train.batch_size"),
    ("", ["nodots=1"], "must be dotted"),
    ("", ["network_slimming.prune_at=[1.5]"], "prune_at"),
    ("", ["network_slimming.prune_within_epochs=0"], "prune_within_epochs"),
    ("", ["network_slimming.prune_within_epochs=.inf"], "prune_within_epochs"),
    ("wrong: {x: 1}\n", [], "unknown key 'wrong'"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, capsys, text, override, needle):
    f = write(tmp_path / "c.yaml", text)
    with pytest.raises(DanceError, match=None) as err:
        load_config(f, override)
    assert needle in str(err.value)
    # the CLI prints exactly one line and never starts work
    rc = main(["train", "--config", str(f), *override, "--out", str(tmp_path / "run")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and needle in lines[0]
    assert not (tmp_path / "run").exists()


def test_missing_config_file(tmp_path):
    with pytest.raises(DanceError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_the_demo_config_file_is_the_demos_recipe():
    from dance.report.demo import DEMO_CONFIG
    from_file = load_config(REPO / "configs" / "demo.yaml").to_dict()
    embedded = config_from_dict({**DEMO_CONFIG, "dataset": {**DEMO_CONFIG["dataset"],
                                                            "root": "dance-demo/synthstreets"}})
    assert from_file == embedded.to_dict()


def test_the_converged_recipe_is_the_demos_on_other_data_and_length():
    """The converged recipe was chosen by the saturation rule alone: the demo's model, optimizer
    and schedule, only the data, the crop and the number of epochs differ."""
    demo = load_config(REPO / "configs" / "demo.yaml").to_dict()
    converged = load_config(REPO / "configs" / "converged.yaml").to_dict()
    assert converged["dataset"]["name"] == "cityscapes_categories"
    assert (converged["train"]["epochs"], list(converged["train"]["crop"])) == (192, [32, 64])
    # both say network_budget: auto, which the length resolves (0.4 in the long run, 0.5)
    assert (converged["network_slimming"]["network_budget"],
            demo["network_slimming"]["network_budget"]) == (0.4, 0.5)
    for section in (converged, demo):
        del section["dataset"]
        section["train"].pop("epochs"), section["train"].pop("crop")
        section["network_slimming"].pop("network_budget")
    assert converged == demo


def _alias_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines)


# Each of these was an internal error, a traceback from numpy or torch far into the run, or an
# error line of exponential length before they were checked on load
@pytest.mark.parametrize("text, needle", [
    ("base: null\n", "base: expected a config file name"),
    ("base: 7\n", "base: expected a config file name"),
    ("base: [sub]\n", "is a folder, not a config file"),
    ("base: [latin1.yaml]\n", "latin1.yaml: not UTF-8 text"),
    ("base: [[a, b]]\n", "base: expected a config file name"),
    ("train: {seed: -1}\n", "train.seed"),
    ("train: {seed: 4294967296}\n", "train.seed"),
    ("train: {scale_range: [2.0, 0.5]}\n", "train.scale_range"),
    ("train: {scale_range: [0, 1]}\n", "train.scale_range"),
    ("train: {scale_range: [0.5, 1000]}\n", "train.scale_range"),
    ("train: {crop: [64, 1000000]}\n", "train.crop"),
    ("train: {workers: 100000}\n", "train.workers"),
    ("train: {device: 'cuda:x'}\n", "train.device"),
    ("train: {lr: .inf}\n", "train.lr"),
    ("train: {epochs: 2, epochs: 3}\n", "found the key 'epochs' twice"),
    ("model: {options: {width_mult: -2}}\n", "option 'width_mult'"),
    ("model: {options: {aspp_channels: 100000000}}\n", "option 'aspp_channels'"),
    ("model: {options: {atrous_rates: [6, foo]}}\n", "option 'atrous_rates'"),
    ("dataset: {root: \"a\\0b\"}\n", "dataset.root"),
    ("train: {epoch: 3}\n", "did you mean 'train.epochs'"),
    ("train: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    (_alias_bomb() + "\ntrain: {crop: *a8}\n", "alias bomb"),
])
def test_hostile_configs_are_one_short_line_naming_the_key_or_file(tmp_path, capsys, text,
                                                                   needle):
    (tmp_path / "sub").mkdir()
    (tmp_path / "latin1.yaml").write_bytes("train: {epochs: 2}  # caf\xe9\n".encode("latin-1"))
    f = write(tmp_path / "c.yaml", text)
    with pytest.raises(DanceError, match=None):  # on load, not somewhere in the run
        load_config(f)
    rc = main(["train", "--config", str(f), "--out", str(tmp_path / "run")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, lines
    assert needle in lines[0] and "internal error" not in lines[0]
    assert len(lines[0]) < 400
    assert not (tmp_path / "run").exists()


def test_an_alias_bomb_in_an_override_is_refused_too():
    from dance.engine.config import parse_override
    bomb = "{" + ", ".join(f"k{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 9 if i else ["1"] * 9)
                           + "]" for i in range(9)) + "}"
    with pytest.raises(DanceError, match="more than 100,000 values"):
        parse_override(f"model.options={bomb}")


def test_model_options_are_checked_against_the_builder_on_load():
    from dance.network.registry import check_options
    assert check_options("deeplabv3plus_mbv2", {"width_mult": 0.5, "atrous_rates": [2, 4]}) is None
    assert "has no option 'widht_mult'" in check_options("deeplabv3plus_mbv2", {"widht_mult": 1})
    assert "must be a number" in check_options("deeplabv3plus_mbv2", {"dropout": "high"})
    assert "must be a number" in check_options("pspnet_r18", {"ppm_channels": True})
    assert check_options("pspnet_r18", {"bin_channels": None}) is None
    assert "must not be null" in check_options("pspnet_r18", {"ppm_channels": None})


def test_every_error_at_once_each_named_by_the_file_or_the_override(tmp_path):
    f = write(tmp_path / "c.yaml", "train: {epoch: 3, lr: -1}\n")
    with pytest.raises(DanceError) as err:
        load_config(f, ["train.batch_size=abc"])
    text = str(err.value)
    assert "\n" not in text
    # problems from one source follow its name: "c.yaml: train.lr: ...; unknown key ..."
    assert f"{f}: train.lr: Input should be greater than 0 (got -1); unknown key 'train.epoch' " \
        "(did you mean 'train.epochs'?)" in text
    assert "override train.batch_size=abc: train.batch_size: Input should be a valid integer" \
        in text


def test_sizes_may_be_written_hxw_as_on_the_command_line(tmp_path):
    cfg = load_config(None, ["train.crop=64x128", "train.eval_crop=32X64"])
    assert tuple(cfg.train.crop) == (64, 128) and tuple(cfg.train.eval_crop) == (32, 64)
    with pytest.raises(DanceError, match="train.crop"):
        load_config(None, ["train.crop=64x"])


def test_the_ready_configs_ship_in_the_package_and_are_found_by_name(tmp_path, capsys,
                                                                     monkeypatch):
    from dance.engine.config import PACKAGED, packaged_configs
    assert PACKAGED.parent.name == "dance"  # inside the package, so a wheel carries them
    ready = packaged_configs()
    assert len(ready) == 19 and "synth" in ready and ready["synth"][1].startswith("SynthStreets")
    monkeypatch.chdir(tmp_path)  # not the repository: found by name, not by path
    assert load_config("cityscapes_pspnet_r50").model.name == "pspnet_r50"
    with pytest.raises(DanceError, match="did you mean 'synth'"):
        load_config("synthh")
    assert main(["configs"]) == 0
    assert "cityscapes_pspnet_r50" in capsys.readouterr().out
    assert main(["configs", "synth"]) == 0
    assert "base: [base/dance.yaml]" in capsys.readouterr().out


def test_an_auto_network_budget_follows_the_training_budget_below_a_half():
    from dance.engine.run_folder import run_fingerprint
    for budget, expected in ((0.3, 0.3), (0.5, 0.5), (0.8, 0.5)):
        cfg = load_config("demo", [f"data_slimming.budget={budget}"])
        assert cfg.network_slimming.network_budget == expected
    # the recipes say auto; at budget 0.5 their runs are the runs of an explicit 0.5
    auto = load_config("demo", [])
    explicit = load_config("demo", ["network_slimming.network_budget=0.5"])
    assert run_fingerprint(auto.to_dict(), {}) == run_fingerprint(explicit.to_dict(), {})
    with pytest.raises(DanceError, match="network_budget.*auto"):
        load_config("demo", ["network_slimming.network_budget=1.5"])


def test_an_auto_network_budget_goes_further_where_the_data_plan_cuts_little():
    from dance.engine.config import plans_a_long_run
    from dance.engine.run_folder import run_fingerprint
    # the converged recipe slims early in 192 epochs: at 0.5 the plan would be made at 0.92,
    # in the long-run regime, so auto takes the network to 0.4; at 0.3 it stays at 0.3
    assert load_config("converged", []).network_slimming.network_budget == 0.4
    assert load_config("converged", ["data_slimming.budget=0.3"]
                       ).network_slimming.network_budget == 0.3
    # the 24-epoch demo recipe's plan is made at 0.67: not a long run, 0.5 as before; at a
    # training budget of 0.8 its plan would cut little, but the network is slimmed within the
    # run's 24 epochs, not early in a longer one: 0.5 as well
    demo = load_config("demo", [])
    assert demo.network_slimming.network_budget == 0.5 and not plans_a_long_run(demo, 0.5)
    demo = load_config("demo", ["data_slimming.budget=0.8"])
    assert demo.network_slimming.network_budget == 0.5 and plans_a_long_run(demo, 0.5)
    assert load_config("converged", ["network_slimming.prune_within_epochs=null"]
                       ).network_slimming.network_budget == 0.5
    # the regime's switches turn it off: no threshold, a plan that drops anyway, no joint budget
    for off in ("data_slimming.drop_above=null", "data_slimming.drop=true",
                "data_slimming.joint_budget=false", "data_slimming.policy=uniform"):
        assert load_config("converged", [off]).network_slimming.network_budget == 0.5, off
    # an explicit number is never changed, and auto's runs are those of the number it gives
    assert load_config("converged", ["network_slimming.network_budget=0.5"]
                       ).network_slimming.network_budget == 0.5
    assert run_fingerprint(load_config("converged", []).to_dict(), {}) == run_fingerprint(
        load_config("converged", ["network_slimming.network_budget=0.4"]).to_dict(), {})
