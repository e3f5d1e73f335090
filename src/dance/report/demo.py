"""`dance demo`: the embedded default (docs/cli.md#dance-demo). SynthStreets, then baseline vs
short vs uniform vs DANCE at budget 0.5 (its model slimmed to half the inference FLOPs) on a
small model, sized for 2 CPU cores in well under 10 minutes, no network."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from dance.engine.config import config_from_dict
from dance.report.compare import CONVERGED_GAIN, compare, summary_table, verdicts

# One small, fixed recipe: the demo shows the method, it is not tuned to it. The plain recipe
# was chosen first (optimizer, learning rate, schedule; BENCHMARKS.md, "The demo recipe") to be
# as close to converged as a 5-minute demo on 2 CPU cores allows, then never retuned per method.
DEMO_DATA = {"train": 240, "val": 60, "size": (64, 128), "seed": 0}
DEMO_CONFIG = {
    "dataset": {"name": "synth", "train_split": "train", "val_split": "val"},
    "model": {"name": "deeplabv3plus_mbv2",
              "options": {"width_mult": 0.5, "aspp_channels": 64, "decoder_channels": 64}},
    "train": {"epochs": 24, "batch_size": 8, "crop": [64, 128], "lr": 0.02, "seed": 0,
              "device": "cpu", "workers": 1, "scale_range": [0.75, 1.25], "optimizer": "adamw",
              "weight_decay": 0.01, "lr_schedule": "linear", "warmup_fraction": 0.05},
    "data_slimming": {"enabled": True, "indicator": "si", "budget": 0.5},
    "network_slimming": {"enabled": True, "network_budget": "auto"},
}
# How far from converged the demo's plain run is, measured once (seed 0) with
# `dance compare --saturation` on this recipe and recorded in BENCHMARKS.md.
DEMO_SATURATION = {"epochs": (12, 24, 48), "miou": (31.10, 39.23, 46.42)}
DEMO_RUNS = ["baseline", "short", "uniform", "dance"]


def run_demo(out: str | Path, progress: bool = True) -> dict:
    from dance.data.synth import generate_synthstreets
    out = Path(out)
    t0 = time.perf_counter()
    data_root = out / "synthstreets"
    generate_synthstreets(data_root, train=DEMO_DATA["train"], val=DEMO_DATA["val"],
                          size=DEMO_DATA["size"], seed=DEMO_DATA["seed"], progress=progress)
    cfg_dict = {**DEMO_CONFIG, "dataset": {**DEMO_CONFIG["dataset"], "root": str(data_root)}}
    cfg = config_from_dict(cfg_dict, "demo config")
    # the runs train side by side, one per core: small models train faster that way on a CPU
    from dance.parallel import usable_cores
    jobs = max(1, min(len(DEMO_RUNS), usable_cores()))
    report = compare(cfg, DEMO_RUNS, out, seeds=1, progress=progress, jobs=jobs)
    report["demo_seconds"] = time.perf_counter() - t0
    return report


def saturation_line() -> str:
    """How far from converged the demo's plain run is, from the recorded saturation curve."""
    e, m = DEMO_SATURATION["epochs"], DEMO_SATURATION["miou"]
    gain = m[2] - m[1]
    state = ("near converged" if gain < CONVERGED_GAIN else
             "far from converged, so every cut in compute costs accuracy in this regime; a claim "
             "needs a converged recipe: `dance compare --config converged` (docs/method.md)")
    return (f"The plain run scored {m[0]:.1f} / {m[1]:.1f} / {m[2]:.1f} mIoU at {e[0]} / {e[1]} / "
            f"{e[2]} epochs (seed 0, measured once): twice its epochs gain {gain:+.1f}, it is "
            f"{state}.")


def cli_demo(args) -> int:
    report = run_demo(args.out, progress=not args.quiet)
    print(summary_table(report))
    print("\n".join(verdicts(report)))
    print(saturation_line())
    print(f"demo finished in {report['demo_seconds']:.0f} s; report: "
          f"{Path(args.out) / 'report.md'}", file=sys.stdout)
    return 0
