"""Dead channels of each trained run's final model: channels of the removable channel groups whose
Taylor importance is exactly zero on a batch of training crops at full scale (no output and no
gradient: a ReLU that never fires), the count behind BENCHMARKS.md's "Seventh round" table.

    python benchmarks/dead_channels.py COMPARE_DIR [--images 8] [--seed 0]

COMPARE_DIR is a `dance compare --out` folder (every run under its runs/) or one run folder.
The crops are the probe a run draws (seed + 7919), in eval mode, so two runs of one compare
are judged on the same images.
"""
import argparse
import json
import sys
from pathlib import Path


def dead_channels(run: Path, images: int, seed: int) -> tuple[int, int]:
    """(channels of the removable groups, of them dead) of the run's final model."""
    from dance.data.datasets import open_dataset
    from dance.data.loader import PlannedDataset
    from dance.data.transforms import TrainTransform
    from dance.engine.checkpoint import load_model
    from dance.engine.train import probe_batches

    cfg = json.loads((run / "checkpoint" / "state.json").read_text())["config"]
    ds, tc = cfg["dataset"], cfg["train"]
    train = open_dataset(ds["name"], ds["root"], ds["train_split"])
    data = PlannedDataset(train, TrainTransform(tuple(tc["crop"]), tuple(tc["scale_range"])),
                          seed=seed)
    return count_dead(load_model(run), probe_batches(data, images, images, seed), tc["crop"])


def count_dead(model, batches, crop) -> tuple[int, int]:
    """(channels of ``model``'s removable groups, of them with zero Taylor importance on
    ``batches``), the model in eval mode; its gradients are cleared after."""
    from dance.engine.loss import weighted_cross_entropy
    from dance.network import channels as ch

    scores = ch.taylor_importance(model.eval(), batches,
                                  lambda logits, y: weighted_cross_entropy(logits.float(), y)[0])
    widths = {g.layer: g.channels for g in ch.channel_groups(model, (1, 3, *crop))}
    return sum(widths.values()), sum(int((scores[layer] == 0).sum()) for layer in widths)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    runs = sorted(d for d in (args.folder / "runs").iterdir() if d.is_dir()) \
        if (args.folder / "runs").is_dir() else [args.folder]
    print(f"{'run':<28} {'channels':>9} {'dead':>6} {'share':>6}")
    for run in runs:
        if not (run / "metrics.json").is_file():
            continue  # not finished
        total, dead = dead_channels(run, args.images, args.seed)
        print(f"{run.name:<28} {total:>9} {dead:>6} {dead / max(total, 1):>6.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
