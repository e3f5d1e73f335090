"""`dance eval` and `dance export` on a trained run (docs/cli.md#dance-eval, #dance-export)."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from dance.data.datasets import open_dataset
from dance.engine import checkpoint as ckpt
from dance.engine.evaluate import AdaptiveResolution, eval_fields
from dance.engine.runtime import pick_device
from dance.errors import DanceError


def inference_settings(state: dict, mode: str | None, crop: tuple[int, int] | None
                       ) -> tuple[str, tuple[int, int]]:
    """Evaluation mode and window size: those given, else the run's own (``train.eval_mode``,
    ``train.eval_crop``, else its training crop)."""
    train_cfg = state.get("config", {}).get("train", {})
    mode = mode or train_cfg.get("eval_mode", "whole")
    crop = crop or train_cfg.get("eval_crop") or train_cfg.get("crop") or (512, 1024)
    return mode, tuple(crop)


def eval_checkpoint(checkpoint: str | Path, dataset: str, root: str, split: str = "val",
                    mode: str | None = None, crop: tuple[int, int] | None = None,
                    adaptive_resolution: bool = False, device: str = "auto",
                    progress: bool = True) -> dict:
    model, state, folder = ckpt.open_checkpoint(checkpoint)
    dev = pick_device(device)
    model.to(dev)
    ds = open_dataset(dataset, root, split)
    if ds.num_classes != state["arch"]["num_classes"]:
        raise DanceError(f"{folder}: model predicts {state['arch']['num_classes']} classes, "
                         f"dataset {dataset} has {ds.num_classes}")
    mode, crop = inference_settings(state, mode, crop)
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
    model, state, _ = ckpt.open_checkpoint(args.checkpoint)
    path = export(model, args.out, format=args.format, class_names=_class_names(state))
    print(f"exported {model.dance_arch.name} ({args.format}) -> {path}")
    return 0


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _image_files(folder: Path) -> list[Path]:
    """The images under ``folder`` (any depth, by suffix, dotfiles left out), sorted."""
    if not folder.is_dir():
        raise DanceError(f"{folder}: images folder not found")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower()
                   in IMAGE_SUFFIXES and not any(part.startswith(".") for part in
                                                 p.relative_to(folder).parts))
    if not files:
        raise DanceError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it")
    return files


def overlay_with_legend(image: np.ndarray, labels: np.ndarray, colors: np.ndarray,
                        names: list[str], alpha: float = 0.5) -> np.ndarray:
    """``image`` blended with the colour of each pixel's class, and below it a legend of the
    classes present (swatch and name), most pixels first."""
    from PIL import Image, ImageDraw
    valid = labels < len(colors)
    blend = image.astype(np.float32)
    blend[valid] = (1 - alpha) * blend[valid] + alpha * colors[labels[valid]]
    present = np.bincount(labels[valid].ravel(), minlength=len(colors))
    shown = [int(c) for c in np.argsort(-present) if present[c] > 0]
    h, w = labels.shape
    row, per_row = 16, max(1, w // 120)
    legend = Image.new("RGB", (w, row * (-(-len(shown) // per_row)) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for k, c in enumerate(shown):
        x, y = (k % per_row) * (w // per_row) + 4, (k // per_row) * row + 3
        draw.rectangle([x, y, x + 11, y + 11], fill=tuple(int(v) for v in colors[c]))
        draw.text((x + 15, y), names[c], fill=(0, 0, 0))
    return np.concatenate([blend.round().astype(np.uint8), np.asarray(legend)], axis=0)


def predict_folder(checkpoint: str | Path, images: str | Path, out: str | Path,
                   adaptive_resolution: bool = False, device: str = "auto",
                   mode: str | None = None, crop: tuple[int, int] | None = None,
                   progress: bool = True) -> dict:
    """Segment every image under ``images`` with a trained run: ``OUT/REL.png`` holds each
    pixel's train id (uint8; uint16 beyond 255 classes), ``OUT/REL_overlay.png`` the image
    with its classes' colours and a legend, REL being the image's path under ``images``
    without its suffix. Returns a summary (counts, and the scales used with
    ``adaptive_resolution``)."""
    from tqdm import tqdm

    from dance.data.datasets import class_colors
    from dance.data.io import png_bytes, read_image
    from dance.data.transforms import image_tensor
    from dance.engine.evaluate import _inference, default_stride, infer_image
    from dance.fileio import atomic_write_bytes
    images, out = Path(images), Path(out)
    files = _image_files(images)
    model, state, folder = ckpt.open_checkpoint(checkpoint)
    dev = pick_device(device)
    model.to(dev)
    num_classes = state["arch"]["num_classes"]
    names = _class_names(state) or [f"class {i}" for i in range(num_classes)]
    colors = class_colors(names)
    mode, crop = inference_settings(state, mode, crop)
    policy = _adaptive_policy(state, folder) if adaptive_resolution else None
    scales: Counter = Counter()
    with _inference(model) as net:
        for f in tqdm(files, desc="predict", unit="img", disable=None if progress else True):
            image = read_image(f)
            scale = float(policy(image)) if policy is not None else 1.0
            scales[f"{scale:g}"] += 1
            logits, _, _ = infer_image(net, image_tensor(image)[None].to(dev), mode, crop,
                                       default_stride(crop), scale, str(f))
            labels = logits.argmax(1)[0].cpu().numpy()
            labels = labels.astype(np.uint8 if num_classes <= 255 else np.uint16)
            rel = f.relative_to(images).with_suffix("")
            atomic_write_bytes(out / f"{rel}.png", png_bytes(labels))
            atomic_write_bytes(out / f"{rel}_overlay.png",
                               png_bytes(overlay_with_legend(image, labels, colors, names)))
    result = {"images": len(files), "out": str(out), "classes": names, "mode": mode,
              "checkpoint": str(folder)}
    if policy is not None:
        result["scales"] = dict(sorted(scales.items()))  # "scale" -> images
    return result


def cli_predict(args) -> int:
    res = predict_folder(args.checkpoint, args.images, args.out, args.adaptive_resolution,
                         args.device, args.mode, args.crop, progress=not args.quiet)
    extra = f", scales {res['scales']}" if "scales" in res else ""
    print(f"segmented {res['images']} images -> {res['out']} (NAME.png: train ids; "
          f"NAME_overlay.png: colours and legend){extra}")
    return 0
