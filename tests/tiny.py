"""What the end-to-end tests share: a run small enough for 2 CPU cores, on tiny SynthStreets."""
from dance.data.synth import generate_synthstreets

TINY = ["train.epochs=2", "train.batch_size=4", "train.crop=[64,128]", "train.workers=0",
        "train.device=cpu", "train.lr=0.02",
        "model.options={width_mult: 0.35, aspp_channels: 16}"]


def tiny_synth(tmp_path_factory, train: int, val: int, seed: int):
    root = tmp_path_factory.mktemp("synth")
    generate_synthstreets(root, train=train, val=val, size=(64, 128), seed=seed, progress=False)
    return root


def tiny_config(tmp_path_factory, root, body: str):
    """A config file on the tiny SynthStreets at ``root``; ``body`` holds the other sections."""
    f = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    f.write_text(f"dataset: {{name: synth, root: {root}}}\n" + body)
    return f
