"""`dance eval` and `dance export` on a trained run (docs/cli.md#dance-eval, #dance-export)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from dance.data.datasets import open_dataset
from dance.engine import checkpoint as ckpt
from dance.engine.evaluate import AdaptiveResolution, eval_fields
from dance.engine.runtime import pick_device
from dance.errors import DanceError


def eval_checkpoint(checkpoint: str | Path, dataset: str, root: str, split: str = "val",
                    mode: str | None = None, crop: tuple[int, int] | None = None,
                    adaptive_resolution: bool = False, device: str = "auto",
                    progress: bool = True) -> dict:
    tensors, state, folder = ckpt.read_checkpoint(checkpoint)
    model = ckpt.build_from_arch(state["arch"], str(folder / ckpt.STATE_FILE))
    ckpt.load_weights(model, tensors, folder / ckpt.MODEL_FILE)
    dev = pick_device(device)
    model.to(dev).eval()
    ds = open_dataset(dataset, root, split)
    if ds.num_classes != state["arch"]["num_classes"]:
        raise DanceError(f"{folder}: model predicts {state['arch']['num_classes']} classes, "
                         f"dataset {dataset} has {ds.num_classes}")
    train_cfg = state.get("config", {}).get("train", {})
    mode = mode or train_cfg.get("eval_mode", "whole")
    crop = crop or tuple(train_cfg.get("eval_crop") or train_cfg.get("crop") or (512, 1024))
    resolution = None
    if adaptive_resolution:
        resolution = _adaptive_policy(state, folder)
    out, res = eval_fields(model, ds, device=dev, mode=mode, crop=tuple(crop),
                           amp=dev.type == "cuda", progress=progress, resolution=resolution)
    out.update(split=split, mode=mode, checkpoint=str(folder))
    if resolution is not None:
        out["adaptive_resolution"] = {"mean_gflops": res.get("mean_gflops"),
                                      "scales": res.get("scales"),
                                      "policy": resolution.to_json()}
    return out


def _adaptive_policy(state: dict, folder: Path) -> AdaptiveResolution:
    """Thresholds from the run's training-set complexity scores (saved in its plan)."""
    from dance.data.complexity import IMAGE_INDICATORS
    per_image = state.get("train_state", {}).get("plan", {}).get("per_image", [])
    scores = np.array([p["score"] for p in per_image], dtype=np.float64)
    if len(scores) == 0 or not np.any(scores):
        raise DanceError(f"{folder}: this run has no training complexity scores (plain run?); "
                         "adaptive resolution needs a run trained with data slimming")
    indicator = state.get("config", {}).get("data_slimming", {}).get("indicator", "si")
    if indicator not in IMAGE_INDICATORS:
        raise DanceError(f"{folder}: the run scored images with {indicator!r}, which needs labels; "
                         "adaptive resolution needs an image-only indicator")
    return AdaptiveResolution(scores, indicator=indicator)


def cli_eval(args) -> int:
    res = eval_checkpoint(args.checkpoint, args.dataset, args.root, args.split, args.mode,
                          args.crop, args.adaptive_resolution, args.device,
                          progress=not args.json)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"mIoU {res['miou']:.2f}  pixel acc {res['pixel_acc']:.2f}  params "
              f"{res['params'] / 1e6:.2f} M  {res['gflops']:.2f} GFLOPs at "
              f"{res['input_size'][0]}x{res['input_size'][1]}  latency {res['latency_ms']:.1f} ms"
              f"  peak memory {res['peak_memory_mb']:.1f} MB", file=sys.stdout)
        if "adaptive_resolution" in res:
            ar = res["adaptive_resolution"]
            print(f"adaptive resolution: mean {ar['mean_gflops']:.2f} GFLOPs, scales {ar['scales']}")
    return 0


def _class_names(state: dict) -> list[str] | None:
    """The train classes' names of a checkpoint: saved with it, or (checkpoints written before
    they were) the table of its dataset layout; None when neither is known."""
    if isinstance(state.get("classes"), list):
        return [str(c) for c in state["classes"]]
    from dance.data.datasets import layout_class_names
    names = layout_class_names(state.get("config", {}).get("dataset", {}).get("name"))
    return names if names and len(names) == state["arch"]["num_classes"] else None


def cli_export(args) -> int:
    from dance.network.export import export
    state, _ = ckpt.read_state(args.checkpoint)
    model = ckpt.load_model(args.checkpoint)
    path = export(model, args.out, format=args.format, class_names=_class_names(state))
    print(f"exported {model.dance_arch.name} ({args.format}) -> {path}")
    return 0
