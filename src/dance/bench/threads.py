"""`dance bench threads`: how to spend a CPU's cores on training, measured side by side.

The plain run of one recipe trained with each thread count in turn (one run at a time), then as
many one-thread runs as there are cores side by side (what `dance compare --jobs` does): the
training images per second of the machine in each layout, over torch's default threads. On
small models a second thread mostly waits for the first, so several runs at a time can pay more
than one run with every core.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dance.bench import common


def _thread_counts(cores: int) -> list[int]:
    """1, 2, 4, ... up to the machine's cores, and the cores themselves."""
    counts, t = [], 1
    while t < cores:
        counts.append(t)
        t *= 2
    return counts + [cores]


def bench_threads(model: str = "deeplabv3plus_mbv2", size: tuple[int, int] = (64, 128),
                  train_images: int = 96, epochs: int = 2, batch: int = 8, workers: int = 1,
                  data: str | os.PathLike | None = None, model_options: dict | None = None
                  ) -> dict:
    """Images/s of the plain run at each thread count, and of ``cores`` one-thread runs side by
    side (all their images over the longest one's training seconds), with ratios over torch's
    default count. Training seconds exclude process start-up and evaluation throughout."""
    import torch

    from dance.bench.train import default_model_options
    from dance.data.synth import generate_synthstreets
    from dance.engine.config import config_from_dict
    from dance.engine.train import train
    from dance.parallel import usable_cores
    from dance.report.compare import RunJob, dataset_fingerprint_of, train_all
    machine = common.machine_info("cpu")
    cores = usable_cores()
    default_threads = torch.get_num_threads()
    options = default_model_options(model) if model_options is None else dict(model_options)
    root = common.synth_root(data, train_images, 2, size)
    generate_synthstreets(root, train=train_images, val=2, size=size, seed=0, progress=True)
    base = config_from_dict({
        "dataset": {"name": "synth", "root": str(root)},
        "model": {"name": model, "options": options},
        "train": {"epochs": epochs, "batch_size": batch, "crop": list(size), "lr": 0.01,
                  "device": "cpu", "workers": workers, "scale_range": [0.75, 1.25]},
        "data_slimming": {"enabled": False}, "network_slimming": {"enabled": False},
    }, "dance bench threads")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dance-bench-threads-") as folder:
        for threads in _thread_counts(cores):
            cfg = base.model_copy(deep=True)
            cfg.train.threads = threads
            common.say(f"one run, {threads} thread(s)")
            m = train(cfg, Path(folder) / f"t{threads}", progress=False)
            rows.append({"layout": f"1 run x {threads} thread(s)", "runs": 1, "threads": threads,
                         "images_per_second": m["images_per_second"]})
        if cores > 1:
            common.say(f"{cores} runs side by side, 1 thread each")
            jobs = []
            for i in range(cores):
                cfg = base.model_copy(deep=True)
                cfg.train.threads = 1
                jobs.append(RunJob(cfg, Path(folder) / f"side{i}", f"side by side {i + 1}"))
            results = train_all(jobs, Path(folder) / "scores.cache.json",
                                dataset_fingerprint_of(base), False, jobs=cores)
            # like the rows above, training time only (process start-up and evaluation out):
            # every run's images over the longest run's training seconds
            images = sum(m["images_per_second"] * m["train_seconds"] for m, _ in results)
            longest = max(m["train_seconds"] for m, _ in results)
            rows.append({"layout": f"{cores} runs x 1 thread, side by side", "runs": cores,
                         "threads": 1, "images_per_second": images / longest})
    ref = next((r for r in rows if r["runs"] == 1 and r["threads"] == default_threads), None)
    for r in rows:
        r["ratio"] = r["images_per_second"] / ref["images_per_second"] if ref else float("nan")
    return {"bench": "threads", "machine": common.finish_machine(machine),
            "setup": {"model": model, "model_options": options, "size": list(size),
                      "train": train_images, "epochs": epochs, "batch": batch,
                      "workers": workers, "default_threads": default_threads,
                      "data": str(root)},
            "rows": rows}


def format_threads(r: dict) -> str:
    s = r["setup"]
    table = common.markdown_table(
        ["layout", "training images/s (machine)",
         f"× 1 run at torch's default {s['default_threads']} threads"],
        [(row["layout"], f"{row['images_per_second']:.1f}", f"{row['ratio']:.2f}×")
         for row in r["rows"]])
    return (f"{s['model']} plain run on SynthStreets {s['size'][0]}x{s['size'][1]}, "
            f"{s['train']} images x {s['epochs']} epochs, batch {s['batch']}, "
            f"{s['workers']} loader worker(s) per run.\n{common.machine_line(r['machine'])}\n\n"
            f"{table}")


run = common.cli_runner(bench_threads, format_threads, "model", "size", "train", "epochs",
                        "batch", "workers", "data", "model_options")
