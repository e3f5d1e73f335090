"""The absolute claim, on a recipe trained to convergence: for a machine with a GPU.

The demo recipe (configs/demo.yaml) is far from converged on a 2-core CPU: twice its epochs still
gain about 5 mIoU at 96 epochs (BENCHMARKS.md). This script runs the same recipe, data and model
for as many epochs as convergence needs, in two steps, each a `dance compare` whose runs are
reused by fingerprint if the script is run again:

1. the saturation check (`--saturation`: the plain recipe at 0.5x, 1x and 2x ``--epochs``);
2. every run kind at budget 0.5 with ``--seeds`` seeds.

    python benchmarks/converged.py --epochs 400 --device cuda --jobs 4 --out converged
    python benchmarks/converged.py --dry-run --out /tmp/converged-dry   # CPU, a minute

``--style suburb-dusk`` runs the second scene family. ``--dry-run`` checks the whole path on the
CPU with 16 images and 2 epochs. Each step prints its table; the folders keep report.md,
report.json and saturation.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from dance.cli import main

RUNS = "baseline,short,uniform,progressive,shuffled,dance"


def recipe(root: Path, epochs: int, device: str) -> dict:
    """configs/demo.yaml with this data, length and device."""
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
                         .read_text())
    cfg["dataset"]["root"] = str(root)
    cfg["train"].update(epochs=epochs, device=device)
    return cfg


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=400, help="epochs of the recipe (the 1x run)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--jobs", type=int, default=4, help="runs at a time (they share the GPU)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--style", default="streets", help="SynthStreets scene family")
    p.add_argument("--out", default="converged")
    p.add_argument("--dry-run", action="store_true", help="CPU, 16 images, 2 epochs, 1 seed")
    a = p.parse_args(argv)
    out = Path(a.out)
    train, val, epochs, seeds, device = 240, 60, a.epochs, a.seeds, a.device
    if a.dry_run:
        train, val, epochs, seeds, device = 16, 4, 2, 1, "cpu"
    data = out / f"synth-{a.style}"
    rc = main(["synth", "--out", str(data), "--train", str(train), "--val", str(val),
               "--size", "64x128", "--seed", "0", "--style", a.style])
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
