"""`dance bench pipeline`: decode + augment + collate throughput at every scale of the data plan
next to full scale, and decode alone: whether the data pipeline eats the savings of
downsampling (the image is decoded at full resolution whatever its scale)."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from dance.bench import common
from dance.data.plan import DEFAULT_SCALE_SET
from dance.errors import DanceError


class _DecodeOnly(torch.utils.data.Dataset):
    """Image and mask read and mapped to train ids, nothing else: what every scale pays."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> int:
        self.dataset.load(index)
        return index


def bench_pipeline(n: int = 64, size: tuple[int, int] = (256, 512),
                   crop: tuple[int, int] = (256, 512), workers: int = 1, batch: int = 8,
                   repeats: int = 3, data: str | os.PathLike | None = None, fmt: str = "png",
                   decode_cache: bool = False,
                   scale_set: Sequence[float] = DEFAULT_SCALE_SET) -> dict:
    """Images/s of the training data pipeline (`PlannedDataset` + `TrainTransform` through a
    `DataLoader` with the `BucketedBatchSampler`: decode, augment, collate, no model) with every
    image at each scale of ``scale_set``, next to full scale and to decode alone, best of
    ``repeats`` alternating rounds. One loader serves every scale (persistent workers, the plan
    swapped between epochs as the trainer does), so worker start-up is in none of them.
    ``fmt="jpeg"``: the same images stored as JPEG (quality 90, `folder` layout), which the
    loader decodes at the smallest DCT scale that covers each sample; the masks it gives are
    checked to equal the full-resolution decode's, nearest-downsampled. ``decode_cache``: the
    loader reads through a `DecodeCache` next to the data (filled by the warm-up round), as
    ``train.decode_cache`` does."""
    from torch.utils.data import DataLoader

    from dance.data.loader import PlannedDataset, collate_planned
    from dance.data.plan import uniform_plan
    from dance.data.sampler import BucketedBatchSampler
    from dance.data.transforms import TrainTransform
    scale_set = sorted({float(s) for s in scale_set} | {1.0})
    machine = common.machine_info("cpu")
    if fmt not in ("png", "jpeg"):
        raise DanceError(f"format must be png or jpeg, got {fmt!r}")
    root = common.synth_root(data, n, 0, size)
    dataset, made = common.synth_dataset(root, n, 0, size)
    if fmt == "jpeg":
        dataset = common.jpeg_folder(dataset, root / "jpeg")
    ids = [s.id for s in dataset.samples]
    transform = TrainTransform(crop)
    plans = {s: uniform_plan(ids, s * s) for s in scale_set}  # every image at scale s
    sampler = BucketedBatchSampler(plans[1.0], batch, epochs=1, seed=0)
    persistent = {"num_workers": workers, "persistent_workers": workers > 0}
    cache = None
    if decode_cache:
        from dance.data.decode_cache import DecodeCache
        cache = DecodeCache(root / f"decode-cache-{fmt}", max_gb=64)
    loader = DataLoader(PlannedDataset(dataset, transform, seed=0, decode_cache=cache),
                        batch_sampler=sampler,
                        collate_fn=collate_planned, **persistent)
    # collate_fn=len: a batch of decode-only items is just counted
    decode_loader = DataLoader(_DecodeOnly(dataset), batch_size=batch, collate_fn=len,
                               **persistent)
    shapes: dict[float, tuple[int, int]] = {}

    def at_scale(scale: float) -> Callable[[], int]:
        def run() -> int:
            sampler.plan = plans[scale]
            images = 0
            for b in loader:
                images += b["image"].shape[0]
                shapes[scale] = tuple(b["image"].shape[-2:])
            return images
        return run

    runs = {"decode only": lambda: sum(decode_loader)}
    runs.update({repr(s): at_scale(s) for s in scale_set})
    common.say(f"{len(dataset)} images at {len(scale_set)} scales, {workers} worker(s), "
         f"{repeats} round(s) after a warm-up")
    common.side_by_side(runs, 1)  # warm-up: workers started, page cache and kernels warm
    speed = common.side_by_side(runs, repeats)
    full = speed[repr(1.0)]
    full_pixels = shapes[1.0][0] * shapes[1.0][1]
    labels_identical = _labels_match_full_decode(PlannedDataset(dataset, transform, seed=0),
                                                 scale_set)
    return {
        "bench": "pipeline", "machine": common.finish_machine(machine),
        "labels_identical_to_full_decode": labels_identical,
        "setup": {"images": len(dataset), "format": fmt, "decode_cache": decode_cache,
                  "size": list(size), "crop": list(crop),
                  "scale_range": list(transform.scale_range), "workers": workers,
                  "batch": batch, "repeats": repeats, "data": str(root),
                  "data_reused": made["reused"]},
        "decode_only_images_per_second": speed["decode only"],
        "decode_only_ratio_vs_full_scale": speed["decode only"] / full,
        "images_per_second": {repr(s): speed[repr(s)] for s in scale_set},
        "ratio_vs_full_scale": {repr(s): speed[repr(s)] / full for s in scale_set},
        "output_size": {repr(s): list(shapes[s]) for s in scale_set},
        "pixels_vs_full_scale": {repr(s): shapes[s][0] * shapes[s][1] / full_pixels
                                 for s in scale_set},
    }


def _labels_match_full_decode(data, scale_set: Sequence[float], images: int = 8) -> bool:
    """Whether the loader's masks (its image perhaps decoded smaller) equal the masks of the same
    draw applied to the full-resolution decode, at every scale, for the first ``images``."""
    from dance.data.loader import sample_generator
    for scale in scale_set:
        for i in range(min(images, len(data))):
            image, mask = data.dataset.load(i)
            _, want = data.transform(image, mask, scale, sample_generator(data.seed, 0, i))
            if not torch.equal(data[(i, scale, 0)]["mask"], want):
                return False
    return True


def format_pipeline(r: dict) -> str:
    s = r["setup"]
    h, w = s["size"]
    rows = [("decode only", f"{h}x{w} (as stored)", f"{r['decode_only_images_per_second']:.1f}",
             f"{r['decode_only_ratio_vs_full_scale']:.2f}×", "")]
    rows += [(f"scale {k}", "x".join(map(str, r["output_size"][k])), f"{ips:.1f}",
              f"{r['ratio_vs_full_scale'][k]:.2f}×", f"{r['pixels_vs_full_scale'][k]:.3f}")
             for k, ips in sorted(r["images_per_second"].items(), key=lambda kv: float(kv[0]))]
    table = common.markdown_table(["run", "output HxW", "images/s", "vs scale 1.0",
                            "pixels vs scale 1.0"], rows)
    cached = ", through the decode cache" if s.get("decode_cache") else ""
    return (f"Data pipeline (decode + augment + collate, no model): SynthStreets {h}x{w} "
            f"({s.get('format', 'png').upper()}{cached}), "
            f"{s['images']} images, crop {s['crop'][0]}x{s['crop'][1]}, random scale "
            f"{s['scale_range'][0]:g}-{s['scale_range'][1]:g}, batch {s['batch']}, "
            f"{s['workers']} worker(s), best of {s['repeats']} alternating rounds.\n"
            f"{common.machine_line(r['machine'])}\n\n{table}\n\n"
            f"Decoding alone runs at {r['decode_only_ratio_vs_full_scale']:.2f}× the full-scale "
            f"pipeline: no scale can make the data pipeline faster than that, while the "
            f"model's work falls with the pixels. Masks equal to the full-resolution decode's: "
            f"{'yes' if r['labels_identical_to_full_decode'] else 'NO'}.")


run = common.cli_runner(bench_pipeline, format_pipeline, "n", "size", "crop", "workers", "batch",
                 "repeats", "data", "fmt", "decode_cache")
