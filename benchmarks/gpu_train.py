"""Plain vs DANCE training, side by side in one process (issue 4/5 GPU check).

    python benchmarks/gpu_train.py --out /tmp/gpu-bench            # H100/H200: r50 at 512x1024
    python benchmarks/gpu_train.py --size 64x128 --model deeplabv3plus_mbv2 --train 32 --device cpu

Generates SynthStreets at the given size, trains the plain run and DANCE (budget 0.5, network
slimming on) with the same data, model, epochs and seed (AMP bf16 on CUDA), and prints images/s,
energy (measured through NVML on CUDA, else estimated), the realised training-FLOPs ratio and
mIoU, each as DANCE over plain. Writes ``results.json`` in --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import dance  # noqa: F401  (sets OpenMP's passive waiting before torch loads)
import torch

from dance.data.synth import generate_synthstreets
from dance.engine.config import config_from_dict
from dance.engine.train import train
from dance.fileio import atomic_write_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-bench")
    ap.add_argument("--model", default="deeplabv3plus_r50")
    ap.add_argument("--size", default="512x1024")
    ap.add_argument("--train", type=int, default=96)
    ap.add_argument("--val", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    h, w = (int(v) for v in args.size.split("x"))
    out = Path(args.out)
    t0 = time.perf_counter()
    generate_synthstreets(out / "data", train=args.train, val=args.val, size=(h, w), seed=0,
                          progress=False)
    print(f"data ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    base = {
        "dataset": {"name": "synth", "root": str(out / "data")},
        "model": {"name": args.model},
        "train": {"epochs": args.epochs, "batch_size": args.batch, "crop": [h, w], "lr": 0.01,
                  "device": args.device, "amp": True, "workers": args.workers,
                  "scale_range": [0.75, 1.25]},
        "data_slimming": {"enabled": False, "budget": 0.5},
        "network_slimming": {"enabled": False},
    }
    results = {}
    for kind in ("plain", "dance"):
        cfg = json.loads(json.dumps(base))
        if kind == "dance":
            cfg["data_slimming"]["enabled"] = True
            cfg["network_slimming"]["enabled"] = True
        m = train(config_from_dict(cfg, kind), out / kind, progress=False)
        results[kind] = {k: m[k] for k in (
            "miou", "images_per_second", "train_seconds", "train_gflops_total", "energy_joules",
            "energy_kind", "planned_cost", "realised_cost", "gflops", "params", "latency_ms",
            "peak_memory_mb", "removed_branches", "device", "phase_seconds")}
        print(f"{kind}: {json.dumps(results[kind])}", file=sys.stderr)
    p, d = results["plain"], results["dance"]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results["ratios"] = {
        "images_per_second": d["images_per_second"] / p["images_per_second"],
        "train_seconds": d["train_seconds"] / p["train_seconds"],
        "train_gflops": d["train_gflops_total"] / p["train_gflops_total"],
        "energy_joules": d["energy_joules"] / p["energy_joules"],
        "infer_gflops": d["gflops"] / p["gflops"],
        "miou_delta": d["miou"] - p["miou"],
    }
    results["setup"] = {**vars(args), "device_name": device, "torch": torch.__version__}
    atomic_write_json(out / "results.json", results)
    print(f"\n{args.model} on SynthStreets {h}x{w}, {args.train} images x {args.epochs} epochs, "
          f"batch {args.batch}, device {device}, torch {torch.__version__}")
    print("| run | images/s | train s | train TFLOPs | energy J | realised/planned | mIoU |")
    print("|---|---|---|---|---|---|---|")
    for k, r in (("plain", p), ("dance", d)):
        print(f"| {k} | {r['images_per_second']:.1f} | {r['train_seconds']:.1f} | "
              f"{r['train_gflops_total'] / 1e3:.1f} | {r['energy_joules']:.0f} "
              f"({r['energy_kind']}) | {r['realised_cost']:.3f}/{r['planned_cost']:.3f} | "
              f"{r['miou']:.2f} |")
    print("ratios dance/plain: " + json.dumps({k: round(v, 3)
                                               for k, v in results["ratios"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
