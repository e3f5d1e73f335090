"""`dance bench`: the speed and memory targets, measured (SPEC §4 `dance bench`).

Each benchmark is a function that returns a JSON-able dict and a formatter that prints it as a
small markdown table headed by the machine it ran on:

* ``bench_complexity``: `dance score` throughput next to decode-only of the same files, and how
  well each image-only indicator ranks the damage of downsampling (SPEC §1.1);
* ``bench_models``: params, GFLOPs and latency of each model before and after removing its
  largest multi-scale branch (SPEC §1.3, §2);
* ``bench_train``: the plain run and DANCE trained with the same data, model, epochs and seed;
* ``bench_pipeline``: decode + augment + collate throughput at every scale of the data plan next
  to full scale, and decode alone: whether the data pipeline eats the savings of downsampling
  (the image is decoded at full resolution whatever its scale).

Every ratio compares runs made in one process. Where a run is short (scoring, inference, a
loader epoch) the runs alternate over several rounds and the best round counts, so load from
other processes on a shared machine falls on both sides alike. ``dance bench SUBCOMMAND`` and
the scripts under ``benchmarks/`` call `main`.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from dance.data.plan import DEFAULT_SCALE_SET
from dance.errors import DanceError

TRAIN_FIELDS = ("miou", "images_per_second", "train_seconds", "train_gflops_total",
                "energy_joules", "energy_kind", "planned_cost", "realised_cost", "gflops",
                "params", "latency_ms", "peak_memory_mb", "removed_branches", "device",
                "phase_seconds")


# --- shared -----------------------------------------------------------------------------------

def machine_info(device: str | torch.device = "cpu") -> dict:
    """What a number was measured on: platform, usable CPUs, load, torch, the CUDA device."""
    device = torch.device(device)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"platform": platform.platform(), "cpu_count": cpus, "torch": torch.__version__,
            "load_average_start": os.getloadavg()[0], "device": str(device)}
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
    return info


def _finish_machine(info: dict) -> dict:
    # the load at the end too: a busy shared machine shows in it, and the reader can judge
    return {**info, "load_average_end": os.getloadavg()[0]}


def machine_line(info: Mapping) -> str:
    """One line naming the machine of ``info`` (`machine_info`)."""
    where = f"CUDA {info['cuda_device']}" if "cuda_device" in info else "CPU"
    load = f"load {info['load_average_start']:.1f}"
    if "load_average_end" in info:
        load += f" → {info['load_average_end']:.1f}"
    return (f"Machine: {info['platform']}, {info['cpu_count']} CPUs ({load}), "
            f"torch {info['torch']}, {where}.")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def side_by_side(runs: Mapping[str, Callable[[], int]], repeats: int) -> dict[str, float]:
    """Best images/s of each run over ``repeats`` rounds. Each run returns how many images it
    processed; every round runs all of them once, in turn, so a busy moment of a shared machine
    falls on one round of each rather than on one run."""
    best = {name: 0.0 for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            images = run()
            best[name] = max(best[name], images / (time.perf_counter() - start))
    return best


def _synth_root(data: str | os.PathLike | None, train: int, val: int,
                size: tuple[int, int]) -> Path:
    """``data``, or a folder of the system temp dir named by the set, reused by later runs."""
    if data is not None:
        return Path(data)
    h, w = size
    return Path(tempfile.gettempdir()) / f"dance-bench-synth-{train}-{val}-{h}x{w}"


def _synth_dataset(root: Path, train: int, val: int, size: tuple[int, int]):
    from dance.data.datasets import open_dataset
    from dance.data.synth import generate_synthstreets
    made = generate_synthstreets(root, train=train, val=val, size=size, seed=0, progress=True)
    return open_dataset("synth", root, "train"), made


def _say(message: str) -> None:
    print(f"[dance bench] {message}", file=sys.stderr, flush=True)


# --- complexity: `dance score` vs decode-only, indicators vs label_aliasing (SPEC §1.1) ---------

def _decode_only(path: str) -> tuple[int, ...]:
    from dance.data.io import read_image
    return read_image(path).shape


def scoring_throughput(dataset, workers: int | None, repeats: int) -> dict[str, float]:
    """Images/s of decode-only and of cold-cache scoring (si, the image indicators, all), in the
    same process pool (`parallel_map`)."""
    from dance.data.complexity import IMAGE_INDICATORS, INDICATORS
    from dance.data.scoring import parallel_map, score_dataset
    paths = [str(s.image) for s in dataset.samples]
    for p in paths + [str(s.mask) for s in dataset.samples]:  # page cache warm for every run
        Path(p).read_bytes()

    def score(indicators: tuple[str, ...]) -> Callable[[], int]:
        return lambda: len(score_dataset(dataset, indicators, workers=workers,
                                         progress=False)) // len(indicators)

    return side_by_side({
        "decode only": lambda: len(list(parallel_map(_decode_only, paths, workers,
                                                     progress=False))),
        "score si": score(("si",)),
        f"score {len(IMAGE_INDICATORS)} image indicators": score(IMAGE_INDICATORS),
        f"score all {len(INDICATORS)} (+ mask decode)": score(INDICATORS),
    }, repeats)


def spearman(a, b) -> tuple[float, float]:
    """Spearman's rho (Pearson correlation of mid-ranks, so ties are handled) and its two-sided
    p-value from the large-sample normal approximation ``rho * sqrt(n - 1)``; NaN when either
    side is constant."""
    import math

    from dance.data.plan import percentile_rank
    ra, rb = percentile_rank(np.asarray(a, float)), percentile_rank(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    if denom == 0.0:
        return float("nan"), float("nan")
    rho = float((ra * rb).sum()) / denom
    return rho, math.erfc(abs(rho) * math.sqrt(len(ra) - 1) / math.sqrt(2.0))


def rank_correlations(dataset, workers: int | None, scale: float = 0.5) -> dict[str, dict]:
    """Spearman rho (and p-value) of each image indicator with label_aliasing at ``scale``."""
    from dance.data.complexity import IMAGE_INDICATORS
    from dance.data.scoring import score_dataset
    rows = score_dataset(dataset, IMAGE_INDICATORS + ("label_aliasing",), workers=workers,
                         progress=False, scale=scale)
    by_name: dict[str, list[float]] = {}
    for r in rows:
        by_name.setdefault(r.indicator, []).append(r.score)
    target = by_name["label_aliasing"]
    out = {}
    for name in IMAGE_INDICATORS:  # a constant column (tiny sets) gives NaN, shown as "-"
        rho, p = spearman(by_name[name], target)
        out[name] = {"rho": rho, "p": p}
    return out


def bench_complexity(n: int = 500, size: tuple[int, int] = (256, 512), workers: int | None = None,
                     data: str | os.PathLike | None = None, repeats: int = 3) -> dict:
    """(a) scoring vs decode-only throughput, cold cache, best of ``repeats``: the indicators
    must cost little next to the decode every image pays anyway (target: `si` >= 0.8x);
    (b) Spearman rho of each image-only indicator with label_aliasing at scale 0.5."""
    from dance.data.scoring import resolve_workers
    machine = machine_info("cpu")
    root = _synth_root(data, n, 0, size)
    dataset, made = _synth_dataset(root, n, 0, size)
    _say(f"scoring {len(dataset)} images, {repeats} round(s)")
    speed = scoring_throughput(dataset, workers, repeats)
    decode = speed["decode only"]
    rho = rank_correlations(dataset, workers)
    return {
        "bench": "complexity", "machine": _finish_machine(machine),
        "setup": {"images": len(dataset), "size": list(size), "repeats": repeats,
                  "workers": resolve_workers(workers, len(dataset)), "data": str(root),
                  "data_reused": made["reused"]},
        "images_per_second": speed,
        "ratio_vs_decode": {k: v / decode for k, v in speed.items()},
        "spearman_vs_label_aliasing": rho,
    }


def _maybe(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)  # NaN: a constant column


def format_complexity(r: dict) -> str:
    s = r["setup"]
    speed = markdown_table(["run", "images/s", "vs decode only"], [
        (name, f"{ips:.1f}", f"{r['ratio_vs_decode'][name]:.2f}×")
        for name, ips in r["images_per_second"].items()])
    rho = sorted(r["spearman_vs_label_aliasing"].items(),
                 key=lambda kv: 0.0 if math.isnan(kv[1]["rho"]) else -abs(kv[1]["rho"]))
    corr = markdown_table(["indicator", "Spearman ρ", "p-value"], [
        (name, _maybe(v["rho"], ".3f"), _maybe(v["p"], ".2g")) for name, v in rho])
    return (f"SynthStreets {s['size'][0]}x{s['size'][1]}, {s['images']} images, "
            f"{s['workers']} worker process(es), cold cache, best of {s['repeats']}.\n"
            f"{machine_line(r['machine'])}\n\n(a) throughput of `dance score` next to "
            f"decode-only\n\n{speed}\n\n(b) correlation with label_aliasing at scale 0.5\n\n"
            f"{corr}")


# --- models: before and after removing the largest branch (SPEC §1.3, §2) ---------------------

def latencies_ms(models: list[torch.nn.Module], shape: tuple[int, ...],
                 runs: int) -> list[float | None]:
    """Median latency of each model. Runs alternate between the models, so load from other
    processes on a shared machine falls on all of them alike."""
    if runs <= 0:
        return [None] * len(models)
    device = next(models[0].parameters()).device
    x = torch.rand(shape, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for model in models:
            model(x)  # warm-up: oneDNN / cuDNN pick their kernels on the first call
        for _ in range(runs):
            for model, t in zip(models, times):
                sync()
                start = time.perf_counter()
                model(x)
                sync()
                t.append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


def model_size(model: torch.nn.Module, shape: tuple[int, ...]) -> dict:
    from dance.network.flops import count_gflops
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "gflops": count_gflops(model, shape)}


def largest_branches(model: torch.nn.Module, shape: tuple[int, ...]) -> list[str]:
    """Per multi-scale module, the removable branch whose removal saves the most FLOPs."""
    from dance.network.gates import branches
    best = {}
    for b in branches(model, shape):
        if b.gflops_share > 0 and (b.module_path not in best
                                   or b.gflops_share > best[b.module_path].gflops_share):
            best[b.module_path] = b
    return [b.name for b in best.values()]


def bench_models(size: tuple[int, int] = (512, 1024), device: str = "cpu",
                 models: Sequence[str] | None = None, runs: int = 5, threads: int = 2,
                 num_classes: int = 19) -> dict:
    """Params and GFLOPs (FlopCounterMode, multiply-add = 2) of each model and of a copy with
    the largest branch of each multi-scale module removed; latency: median of ``runs`` forwards
    (batch 1, eval, inference mode, fp32) after one warm-up, the two models alternating."""
    from dance.engine.train import pick_device
    from dance.network.gates import remove_branches
    from dance.network.registry import build_model, list_models
    names = list(models) if models else list_models()
    unknown = [m for m in names if m not in list_models()]
    if unknown:
        raise DanceError(f"--models: unknown model {unknown[0]!r}; choose from "
                         f"{', '.join(list_models())}")
    dev = pick_device(device)
    machine = machine_info(dev)
    shape = (1, 3, *size)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = []
    try:
        for name in names:
            _say(f"{name}")
            model = build_model(name, num_classes).eval().to(dev)
            slim = copy.deepcopy(model)
            removed = largest_branches(model, shape)
            remove_branches(slim, removed)
            before, after = model_size(model, shape), model_size(slim, shape)
            before["latency_ms"], after["latency_ms"] = latencies_ms([model, slim], shape, runs)
            rows.append({"model": name, "removed": removed, "before": before, "after": after,
                         "ratios": {k: (after[k] / before[k] if before[k] else None)
                                    for k in before}})
    finally:
        torch.set_num_threads(threads_before)
    return {"bench": "models", "machine": _finish_machine(machine),
            "setup": {"size": list(size), "runs": runs, "threads": threads,
                      "num_classes": num_classes},
            "models": rows}


def _change(before: dict, after: dict, key: str, fmt: str) -> str:
    """``before → after (change%)`` for one table column."""
    if before[key] is None:
        return "-"
    if key == "latency_ms" and before[key] < 100:
        fmt = ".1f"
    change = 100 * (after[key] / before[key] - 1)
    return f"{before[key]:{fmt}} → {after[key]:{fmt}} ({change:+.1f}%)"


def format_models(r: dict) -> str:
    s = r["setup"]
    table = markdown_table(
        ["model", "removed", "params (M)", "GFLOPs", "latency (ms, measured)"],
        [(m["model"], ", ".join(m["removed"]) or "-",
          _change(m["before"], m["after"], "params_m", ".2f"),
          _change(m["before"], m["after"], "gflops", ".1f"),
          _change(m["before"], m["after"], "latency_ms", ".0f")) for m in r["models"]])
    return (f"Input 1x3x{s['size'][0]}x{s['size'][1]}, {s['num_classes']} classes, "
            f"{s['runs']} timed runs (median), {s['threads']} CPU threads.\n"
            f"{machine_line(r['machine'])}\n\n{table}")


# --- train: plain vs DANCE side by side --------------------------------------------------------

def default_model_options(model: str) -> dict:
    """The demo's small options for the demo's model (so the defaults run in about a minute on
    two CPU cores), the model's own defaults for any other."""
    from dance.report.demo import DEMO_CONFIG
    demo = DEMO_CONFIG["model"]
    return dict(demo["options"]) if model == demo["name"] else {}


def bench_train(model: str = "deeplabv3plus_mbv2", size: tuple[int, int] = (128, 256),
                train_images: int = 64, val_images: int = 8, epochs: int = 2, batch: int = 8,
                device: str = "auto", workers: int = 1, out: str | os.PathLike | None = None,
                data: str | os.PathLike | None = None, model_options: dict | None = None,
                budget: float = 0.5, progress: bool = False) -> dict:
    """Train the plain run, then DANCE (data slimming at ``budget``, network slimming on), with
    the same SynthStreets data, model, epochs and seed (bf16 autocast on CUDA); ratios DANCE /
    plain of images/s, wall time, training FLOPs, energy and inference FLOPs, and the mIoU
    change. Runs go to ``out`` (with ``results.json``), or to a temp folder removed afterwards;
    the data to ``data``, else ``out/data``, else a reused temp folder."""
    from dance.data.synth import generate_synthstreets
    from dance.engine.config import config_from_dict
    from dance.engine.train import pick_device, train
    from dance.fileio import atomic_write_json
    from dance.report.compare import _jsonable, aggregate, run_config
    dev = pick_device(device)
    machine = machine_info(dev)
    options = default_model_options(model) if model_options is None else dict(model_options)
    root = (Path(data) if data is not None else Path(out) / "data" if out is not None
            else _synth_root(None, train_images, val_images, size))
    generate_synthstreets(root, train=train_images, val=val_images, size=size, seed=0,
                          progress=True)
    base = config_from_dict({
        "dataset": {"name": "synth", "root": str(root)},
        "model": {"name": model, "options": options},
        "train": {"epochs": epochs, "batch_size": batch, "crop": list(size), "lr": 0.01,
                  "device": device, "amp": True, "workers": workers,
                  "scale_range": [0.75, 1.25]},
        "data_slimming": {"budget": budget},
    }, "dance bench train")
    per_kind: dict[str, list[dict]] = {}
    with (nullcontext(out) if out is not None else
          tempfile.TemporaryDirectory(prefix="dance-bench-train-")) as folder:
        for label, kind in (("plain", "baseline"), ("dance", "dance")):
            _say(f"training the {label} run ({model}, {train_images} images x {epochs} epochs)")
            metrics = train(run_config(base, kind, base.train.seed), Path(folder) / label,
                            progress=progress)
            per_kind[kind] = [metrics]
    report = aggregate(per_kind)
    plain, dance = (report["runs"][k] for k in ("baseline", "dance"))
    ratios = {"images_per_second": dance["images_per_second"] / plain["images_per_second"],
              **{k: v for k, v in report["ratios"]["dance"].items() if k != "within_noise"}}
    result = _jsonable({
        "bench": "train", "machine": _finish_machine(machine),
        "setup": {"model": model, "model_options": options, "size": list(size),
                  "train": train_images, "val": val_images, "epochs": epochs, "batch": batch,
                  "workers": workers, "budget": budget, "data": str(root),
                  "out": str(out) if out is not None else None},
        "plain": {k: plain[k] for k in TRAIN_FIELDS},
        "dance": {k: dance[k] for k in TRAIN_FIELDS},
        "ratios": ratios,
    })
    if out is not None:
        atomic_write_json(Path(out) / "results.json", result)
    return result


def format_train(r: dict) -> str:
    s, q = r["setup"], r["ratios"]
    opts = f" {json.dumps(s['model_options'])}" if s["model_options"] else ""
    rows = [(label, f"{m['images_per_second']:.1f}", f"{m['train_seconds']:.1f}",
             f"{m['train_gflops_total']:.1f}", f"{m['energy_joules']:.0f} ({m['energy_kind']})",
             f"{m['realised_cost']:.3f} / {m['planned_cost']:.3f}", f"{m['gflops']:.2f}",
             f"{m['miou']:.2f}") for label, m in (("plain", r["plain"]), ("dance", r["dance"]))]
    rows.append(("**dance / plain**", f"{q['images_per_second']:.2f}×",
                 f"{q['train_seconds']:.2f}×", f"{q['train_gflops']:.2f}×",
                 f"{q['energy_joules']:.2f}×", "", f"{q['infer_gflops']:.2f}×",
                 f"{q['miou_delta']:+.2f}"))
    table = markdown_table(["run", "images/s", "train s", "train GFLOPs", "energy J",
                            "realised / planned cost", "infer GFLOPs", "mIoU"], rows)
    removed = ", ".join(r["dance"]["removed_branches"]) or "none"
    # where the wall time went: a saving of FLOPs need not be one of seconds (new shapes,
    # pruning probes), and this line says which phase took it
    phases = "; ".join(f"{label} " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                 r[label]["phase_seconds"].items())
                       for label in ("plain", "dance"))
    return (f"{s['model']}{opts} on SynthStreets {s['size'][0]}x{s['size'][1]}, "
            f"{s['train']} images x {s['epochs']} epochs, batch {s['batch']}, "
            f"{s['workers']} loader worker(s); DANCE at budget {s['budget']:g} with network "
            f"slimming (removed: {removed}).\n{machine_line(r['machine'])}\n\n{table}\n\n"
            f"Seconds by phase: {phases}.")


# --- pipeline: decode + augment + collate at each scale (SPEC §1.2) ----------------------------

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
                   repeats: int = 3, data: str | os.PathLike | None = None,
                   scale_set: Sequence[float] = DEFAULT_SCALE_SET) -> dict:
    """Images/s of the training data pipeline (`PlannedDataset` + `TrainTransform` through a
    `DataLoader` with the `BucketedBatchSampler`: decode, augment, collate, no model) with every
    image at each scale of ``scale_set``, next to full scale and to decode alone, best of
    ``repeats`` alternating rounds. One loader serves every scale (persistent workers, the plan
    swapped between epochs as the trainer does), so worker start-up is in none of them."""
    from torch.utils.data import DataLoader

    from dance.data.loader import PlannedDataset, collate_planned
    from dance.data.plan import uniform_plan
    from dance.data.sampler import BucketedBatchSampler
    from dance.data.transforms import TrainTransform
    scale_set = sorted({float(s) for s in scale_set} | {1.0})
    machine = machine_info("cpu")
    root = _synth_root(data, n, 0, size)
    dataset, made = _synth_dataset(root, n, 0, size)
    ids = [s.id for s in dataset.samples]
    transform = TrainTransform(crop)
    plans = {s: uniform_plan(ids, s * s) for s in scale_set}  # every image at scale s
    sampler = BucketedBatchSampler(plans[1.0], batch, epochs=1, seed=0)
    persistent = {"num_workers": workers, "persistent_workers": workers > 0}
    loader = DataLoader(PlannedDataset(dataset, transform, seed=0), batch_sampler=sampler,
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
    _say(f"{len(dataset)} images at {len(scale_set)} scales, {workers} worker(s), "
         f"{repeats} round(s) after a warm-up")
    side_by_side(runs, 1)  # warm-up: workers started, page cache and kernels warm
    speed = side_by_side(runs, repeats)
    full = speed[repr(1.0)]
    full_pixels = shapes[1.0][0] * shapes[1.0][1]
    return {
        "bench": "pipeline", "machine": _finish_machine(machine),
        "setup": {"images": len(dataset), "size": list(size), "crop": list(crop),
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


def format_pipeline(r: dict) -> str:
    s = r["setup"]
    h, w = s["size"]
    rows = [("decode only", f"{h}x{w} (as stored)", f"{r['decode_only_images_per_second']:.1f}",
             f"{r['decode_only_ratio_vs_full_scale']:.2f}×", "")]
    rows += [(f"scale {k}", "x".join(map(str, r["output_size"][k])), f"{ips:.1f}",
              f"{r['ratio_vs_full_scale'][k]:.2f}×", f"{r['pixels_vs_full_scale'][k]:.3f}")
             for k, ips in sorted(r["images_per_second"].items(), key=lambda kv: float(kv[0]))]
    table = markdown_table(["run", "output HxW", "images/s", "vs scale 1.0",
                            "pixels vs scale 1.0"], rows)
    return (f"Data pipeline (decode + augment + collate, no model): SynthStreets {h}x{w}, "
            f"{s['images']} images, crop {s['crop'][0]}x{s['crop'][1]}, random scale "
            f"{s['scale_range'][0]:g}-{s['scale_range'][1]:g}, batch {s['batch']}, "
            f"{s['workers']} worker(s), best of {s['repeats']} alternating rounds.\n"
            f"{machine_line(r['machine'])}\n\n{table}\n\n"
            f"Decoding alone runs at {r['decode_only_ratio_vs_full_scale']:.2f}× the full-scale "
            f"pipeline: no scale can make the data pipeline faster than that, while the "
            f"model's work falls with the pixels.")


# --- command line -----------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """Bad options become one-line DanceErrors (the CLI prints them) instead of usage + exit 2."""

    def error(self, message: str):
        where = " ".join(self.prog.split()[2:])  # "dance bench pipeline" -> "pipeline"
        raise DanceError(f"{where}: {message}" if where else message)


def _size(text: str) -> tuple[int, int]:
    from dance.cli import _size as parse_size  # the CLI's one HxW parser
    return parse_size(text)


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v
    return parse


def _device(text: str) -> str:
    if text not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def _model_options(text: str) -> dict:
    try:
        v = json.loads(text)
    except json.JSONDecodeError:
        v = None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as "
                                         f"'{{\"width_mult\": 0.5}}', got {text!r}")
    return v


def _run_complexity(a) -> dict:
    return bench_complexity(a.n, a.size, a.workers, a.data, a.repeats)


def _run_models(a) -> dict:
    names = [m.strip() for m in a.models.split(",") if m.strip()] if a.models else None
    return bench_models(a.size, a.device, names, a.runs, a.threads, a.num_classes)


def _run_train(a) -> dict:
    return bench_train(a.model, a.size, a.train, a.val, a.epochs, a.batch, a.device, a.workers,
                       a.out, a.data, a.model_options, a.budget)


def _run_pipeline(a) -> dict:
    return bench_pipeline(a.n, a.size, a.crop, a.workers, a.batch, a.repeats, a.data)


def _budget(text: str) -> float:
    from dance.data.plan import check_budget
    try:
        return check_budget(float(text))
    except (ValueError, DanceError) as e:
        raise argparse.ArgumentTypeError(str(e) if isinstance(e, DanceError)
                                         else f"expected a number, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """``dance bench SUBCOMMAND [options]`` (what follows ``bench`` on the command line)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object")
    common.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    parser = _Parser(prog="dance bench", description="Benchmarks whose ratios are measured side "
                     "by side in one run, on the machine they name (SPEC §4).")
    sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)

    def command(name: str, run, fmt, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(run=run, format=fmt)
        return p

    p = command("complexity", _run_complexity, format_complexity,
                "`dance score` throughput vs decode-only; indicators vs label_aliasing")
    p.add_argument("--n", type=_int_at_least(2), default=500, help="SynthStreets images")
    p.add_argument("--size", type=_size, default=(256, 512), help="HxW of the images")
    p.add_argument("--workers", type=_int_at_least(0), default=None,
                   help="processes (default: all cores)")
    p.add_argument("--repeats", type=_int_at_least(1), default=3,
                   help="alternating rounds, best kept")
    p.add_argument("--data", default=None, help="SynthStreets root (generated if incomplete)")

    p = command("models", _run_models, format_models,
                "params, GFLOPs, latency before/after removing each model's largest branch")
    p.add_argument("--size", type=_size, default=(512, 1024), help="HxW of the input")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--models", default=None, help="comma-separated (default: all)")
    p.add_argument("--runs", type=_int_at_least(0), default=5,
                   help="timed runs per model (0: params and GFLOPs only)")
    p.add_argument("--threads", type=_int_at_least(1), default=2, help="CPU threads")
    p.add_argument("--num-classes", type=_int_at_least(1), default=19)

    p = command("train", _run_train, format_train,
                "plain vs DANCE training side by side: images/s, wall time, FLOPs, energy")
    p.add_argument("--model", default="deeplabv3plus_mbv2")
    p.add_argument("--model-options", type=_model_options, default=None,
                   help="JSON builder options (default: the demo's small ones for its model)")
    p.add_argument("--size", type=_size, default=(128, 256), help="HxW of images and crop")
    p.add_argument("--train", type=_int_at_least(2), default=64, help="training images")
    p.add_argument("--val", type=_int_at_least(1), default=8, help="validation images")
    p.add_argument("--epochs", type=_int_at_least(1), default=2)
    p.add_argument("--batch", type=_int_at_least(1), default=8)
    p.add_argument("--workers", type=_int_at_least(0), default=1, help="loader processes")
    p.add_argument("--budget", type=_budget, default=0.5, help="DANCE's data budget")
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", default=None,
                   help="keep the runs and results.json here (default: a temp folder)")
    p.add_argument("--data", default=None, help="SynthStreets root (default: OUT/data)")

    p = command("pipeline", _run_pipeline, format_pipeline,
                "data-pipeline images/s at each data-plan scale vs full scale and decode-only")
    p.add_argument("--n", type=_int_at_least(2), default=64, help="SynthStreets images")
    p.add_argument("--size", type=_size, default=(256, 512), help="HxW of the images")
    p.add_argument("--crop", type=_size, default=(256, 512), help="training crop HxW")
    p.add_argument("--workers", type=_int_at_least(0), default=1, help="loader processes")
    p.add_argument("--batch", type=_int_at_least(1), default=8)
    p.add_argument("--repeats", type=_int_at_least(1), default=3,
                   help="alternating rounds, best kept")
    p.add_argument("--data", default=None, help="SynthStreets root (generated if incomplete)")
    return parser


def cli_bench(args: argparse.Namespace) -> int:
    """``dance bench``: parse the subcommand, run it, print its table (or ``--json``)."""
    opts = build_parser().parse_args(args.args)
    if opts.verbose:
        args.verbose = True  # the CLI reads it when reporting an error
    result = opts.run(opts)
    if opts.json:
        from dance.report.compare import _jsonable  # NaN (a constant column) -> null
        print(json.dumps(_jsonable(result), indent=2))
    else:
        print(opts.format(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``dance bench`` with ``argv`` (default: this process's arguments), for the scripts."""
    from dance.cli import main as cli_main
    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])
