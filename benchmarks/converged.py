"""The absolute claim, on a recipe whose plain run is near converged (configs/converged.yaml).

The demo recipe is far from converged (twice its epochs gain about 7 mIoU, BENCHMARKS.md). The
converged recipe keeps the demo's model, optimizer and schedule and trains on SynthStreets at
32x64 read as Cityscapes' 7 categories for 192 epochs, where twice the epochs gain under 1 mIoU;
its plain run takes about 6 minutes on one CPU core. This script runs, each step a `dance
compare` whose runs are reused by fingerprint when the script is run again:

1. the saturation check (`--saturation`: the plain recipe at 0.5x, 1x and 2x ``--epochs``);
2. every run kind at budget 0.5 with ``--seeds`` seeds.

    python benchmarks/converged.py --jobs 2 --out converged                 # 2 CPU cores, ~2 h
    python benchmarks/converged.py --style suburb-dusk --out converged-dusk # the second family
    python benchmarks/converged.py --device cuda --jobs 8 --out converged   # a GPU
    python benchmarks/converged.py --dry-run --out /tmp/converged-dry       # CPU, a minute

``--dry-run`` checks the whole path with 16 images and 2 epochs. Each step prints its table;
the folders keep report.md, report.json and saturation.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from dance.cli import main
from dance.engine.config import packaged_configs

RUNS = "baseline,short,uniform,progressive,shuffled,dance,thin"


def recipe(root: Path, epochs: int | None, device: str) -> dict:
    """configs/converged.yaml with this data, device and length (None: the config's)."""
    cfg = yaml.safe_load(packaged_configs()["converged"][0].read_text())
    cfg["dataset"]["root"] = str(root)
    cfg["train"].update(device=device, **({"epochs": epochs} if epochs else {}))
    return cfg


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of the recipe (the 1x run; default: the config's, 192)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--device", default="cpu")
    p.add_argument("--style", default="streets", help="SynthStreets scene family")
    p.add_argument("--out", default="converged")
    p.add_argument("--dry-run", action="store_true", help="CPU, 16 images, 2 epochs, 1 seed")
    a = p.parse_args(argv)
    out = Path(a.out)
    default = recipe(Path("."), None, a.device)["train"]
    train, val, seeds, device = 240, 60, a.seeds, a.device
    epochs = a.epochs or default["epochs"]
    if a.dry_run:
        train, val, epochs, seeds, device = 16, 4, 2, 1, "cpu"
    data = out / f"synth-{a.style}"
    h, w = default["crop"]
    rc = main(["synth", "--out", str(data), "--train", str(train), "--val", str(val),
               "--size", f"{h}x{w}", "--seed", "0", "--style", a.style])
    if rc:
        return rc
    config = out / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe(data, epochs, device), sort_keys=False))
    common = ["--config", str(config), "--jobs", str(a.jobs), "--quiet"]
    rc = main(["compare", *common, "--saturation", "--out", str(out / "saturation")])
    if rc:
        return rc
    return main(["compare", *common, "--runs", RUNS, "--seeds", str(seeds),
                 "--out", str(out / "compare")])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
