"""Params, GFLOPs and CPU latency of every registered model, before and after removing the
largest branch (by FLOPs saved) of each of its multi-scale modules (SPEC §1.3, §2).

    python benchmarks/models.py                  # 512x1024, 2 threads, median of 5 runs
    python benchmarks/models.py --runs 0         # params and GFLOPs only (seconds)

Prints a markdown table. GFLOPs: FlopCounterMode, multiply-add = 2 (``dance.count_gflops``).
Latency: measured, median wall-clock of ``--runs`` forward passes after one warm-up, batch 1,
eval mode, ``torch.inference_mode``, fp32, the full and the slimmed model alternating, on this
machine's CPU with ``--threads`` threads (or ``--device cuda``).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

import dance
from dance.network.gates import branches, remove_branches


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


def size(model: torch.nn.Module, shape: tuple[int, ...]) -> dict:
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "gflops": dance.count_gflops(model, shape)}


def largest_branches(model: torch.nn.Module, shape: tuple[int, ...]) -> list[str]:
    """Per multi-scale module, the removable branch whose removal saves the most FLOPs."""
    best: dict[str, dance.network.gates.BranchInfo] = {}
    for b in branches(model, shape):
        if b.gflops_share > 0 and (b.module_path not in best
                                   or b.gflops_share > best[b.module_path].gflops_share):
            best[b.module_path] = b
    return [b.name for b in best.values()]


def cell(before: dict, after: dict, key: str, fmt: str) -> str:
    """``before → after (change%)`` for one table column."""
    if before[key] is None:
        return "-"
    if key == "latency_ms" and before[key] < 100:
        fmt = ".1f"
    change = 100 * (after[key] / before[key] - 1)
    return f"{before[key]:{fmt}} → {after[key]:{fmt}} ({change:+.1f}%)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512x1024", help="HxW of the input")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per model (0: skip)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (latency only)")
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--models", default=None, help="comma-separated (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h, w = (int(v) for v in args.size.lower().split("x"))
    shape = (1, 3, h, w)
    names = args.models.split(",") if args.models else dance.list_models()

    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"{args.threads} CPU threads, load average {os.getloadavg()[0]:.1f} at start")
    print(f"Input 1x3x{h}x{w}, {args.num_classes} classes, {args.runs} timed runs (median), "
          f"{where}.\n")
    print("| model | removed | params (M) | GFLOPs | latency (ms, measured) |")
    print("| --- | --- | --- | --- | --- |")
    for name in names:
        model = dance.build_model(name, args.num_classes).eval().to(args.device)
        slim = copy.deepcopy(model)
        removed = largest_branches(model, shape)
        remove_branches(slim, removed)
        before, after = size(model, shape), size(slim, shape)
        before["latency_ms"], after["latency_ms"] = latencies_ms([model, slim], shape, args.runs)

        print(f"| {name} | {', '.join(removed)} | {cell(before, after, 'params_m', '.2f')} | "
              f"{cell(before, after, 'gflops', '.1f')} | "
              f"{cell(before, after, 'latency_ms', '.0f')} |", flush=True)


if __name__ == "__main__":
    main()
