"""`dance bench complexity`: `dance score` throughput next to decode-only of the same files, and
how well each image-only indicator ranks the damage of downsampling (its Spearman correlation
with label_aliasing)."""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dance.bench import common


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

    return common.side_by_side({
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
    machine = common.machine_info("cpu")
    root = common.synth_root(data, n, 0, size)
    dataset, made = common.synth_dataset(root, n, 0, size)
    common.say(f"scoring {len(dataset)} images, {repeats} round(s)")
    speed = scoring_throughput(dataset, workers, repeats)
    decode = speed["decode only"]
    rho = rank_correlations(dataset, workers)
    return {
        "bench": "complexity", "machine": common.finish_machine(machine),
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
    speed = common.markdown_table(["run", "images/s", "vs decode only"], [
        (name, f"{ips:.1f}", f"{r['ratio_vs_decode'][name]:.2f}×")
        for name, ips in r["images_per_second"].items()])
    rho = sorted(r["spearman_vs_label_aliasing"].items(),
                 key=lambda kv: 0.0 if math.isnan(kv[1]["rho"]) else -abs(kv[1]["rho"]))
    corr = common.markdown_table(["indicator", "Spearman ρ", "p-value"], [
        (name, _maybe(v["rho"], ".3f"), _maybe(v["p"], ".2g")) for name, v in rho])
    return (f"SynthStreets {s['size'][0]}x{s['size'][1]}, {s['images']} images, "
            f"{s['workers']} worker process(es), cold cache, best of {s['repeats']}.\n"
            f"{common.machine_line(r['machine'])}\n\n(a) throughput of `dance score` next to "
            f"decode-only\n\n{speed}\n\n(b) correlation with label_aliasing at scale 0.5\n\n"
            f"{corr}")


run = common.cli_runner(bench_complexity, format_complexity, "n", "size", "workers", "data", "repeats")
