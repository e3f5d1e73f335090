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
    assert len(files) == 18  # 4 datasets x 4 model families + SynthStreets + the demo's recipe
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
