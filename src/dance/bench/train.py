"""`dance bench train`: the plain run and DANCE trained side by side with the same data, model,
epochs and seed: images/s, wall time, training FLOPs, energy, inference FLOPs and mIoU."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import nullcontext
from pathlib import Path

from dance.bench import common

TRAIN_FIELDS = ("miou", "images_per_second", "train_seconds", "wall_seconds", "train_gflops_total",
                "energy_joules", "energy_kind", "planned_cost", "realised_cost", "gflops",
                "params", "latency_ms", "peak_memory_mb", "removed_branches", "device",
                "phase_seconds", "step_seconds_by_shape")


def default_model_options(model: str) -> dict:
    """The demo's small options for the demo's model (so the defaults run in about a minute on
    two CPU cores), the model's own defaults for any other."""
    from dance.report.demo import DEMO_CONFIG
    demo = DEMO_CONFIG["model"]
    return dict(demo["options"]) if model == demo["name"] else {}


def _train_both(base, out: str | os.PathLike | None, progress: bool,
                what: str) -> dict[str, list[dict]]:
    """The metrics of the plain run and of DANCE from ``base`` (``what`` names it in the
    progress lines), trained in ``out`` or in a temp folder removed afterwards, by run kind as
    `aggregate` takes them."""
    from dance.engine.train import train
    from dance.report.compare import run_config
    per_kind: dict[str, list[dict]] = {}
    with (nullcontext(out) if out is not None else
          tempfile.TemporaryDirectory(prefix="dance-bench-train-")) as folder:
        for label, kind in (("plain", "baseline"), ("dance", "dance")):
            common.say(f"training the {label} run ({what})")
            metrics = train(run_config(base, kind, base.train.seed), Path(folder) / label,
                            progress=progress)
            per_kind[kind] = [metrics]
    return per_kind


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
    from dance.engine.runtime import pick_device
    from dance.fileio import atomic_write_json, jsonable
    from dance.report.compare import aggregate
    machine = common.machine_info(pick_device(device))
    options = default_model_options(model) if model_options is None else dict(model_options)
    root = (Path(data) if data is not None else Path(out) / "data" if out is not None
            else common.synth_root(None, train_images, val_images, size))
    generate_synthstreets(root, train=train_images, val=val_images, size=size, seed=0,
                          progress=True)
    base = config_from_dict({
        "dataset": {"name": "synth", "root": str(root)},
        "model": {"name": model, "options": options},
        "train": {"epochs": epochs, "batch_size": batch, "crop": list(size), "lr": 0.01,
                  "device": device, "amp": True, "workers": workers, "profile": True,
                  "scale_range": [0.75, 1.25]},
        "data_slimming": {"budget": budget},
    }, "dance bench train")
    what = f"{model}, {train_images} images x {epochs} epochs"
    report = aggregate(_train_both(base, out, progress, what))
    plain, dance = (report["runs"][k] for k in ("baseline", "dance"))
    ratios = {"images_per_second": dance["images_per_second"] / plain["images_per_second"],
              **{k: v for k, v in report["ratios"]["dance"].items() if k != "within_noise"}}
    result = jsonable({
        "bench": "train", "machine": common.finish_machine(machine),
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
    table = common.markdown_table(["run", "images/s", "train s", "train GFLOPs", "energy J",
                            "realised / planned cost", "infer GFLOPs", "mIoU"], rows)
    removed = ", ".join(r["dance"]["removed_branches"]) or "none"
    # where the wall time went: a saving of FLOPs need not be one of seconds (new shapes,
    # pruning probes), and this line says which phase took it
    phases = "; ".join(f"{label} " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                 r[label]["phase_seconds"].items())
                       for label in ("plain", "dance"))
    shapes = sorted({k for label in ("plain", "dance") for k in r[label]["step_seconds_by_shape"]},
                    key=lambda k: [int(v) for v in k.split("x")])

    def ms(label: str, shape: str) -> str:
        step = r[label]["step_seconds_by_shape"].get(shape)
        return f"{step['ms_per_step']:.1f} ({step['steps']})" if step else ""

    steps = common.markdown_table(["input HxW", "plain ms/step (steps)", "dance ms/step (steps)"],
                                  [(k, ms("plain", k), ms("dance", k)) for k in shapes])
    return (f"{s['model']}{opts} on SynthStreets {s['size'][0]}x{s['size'][1]}, "
            f"{s['train']} images x {s['epochs']} epochs, batch {s['batch']}, "
            f"{s['workers']} loader worker(s); DANCE at budget {s['budget']:g} with network "
            f"slimming (removed: {removed}).\n{common.machine_line(r['machine'])}\n\n{table}\n\n"
            f"Seconds by phase: {phases}.\n\nStep time (forward, backward, optimizer) by input "
            f"shape:\n\n{steps}")


run = common.cli_runner(bench_train, format_train, "model", "size", "train", "val", "epochs", "batch",
                 "device", "workers", "out", "data", "model_options", "budget")
