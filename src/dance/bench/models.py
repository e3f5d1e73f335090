"""`dance bench models`: params, GFLOPs and latency of each model before and after removing the
largest branch of each of its multi-scale modules (what network slimming can remove); with
``--compare DIR``, of the deployed model of every run of a `dance compare` folder instead, timed
side by side."""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from dance.bench.common import finish_machine, machine_info, machine_line, markdown_table, say, show
from dance.errors import DanceError

RUNTIMES = ("torch", "onnxruntime")


def _alternating_ms(calls: list, runs: int, sync=lambda: None) -> list[float]:
    """Median milliseconds of each of ``calls`` over ``runs`` rounds after one warm-up call
    each. Runs alternate between the calls, so load from other processes on a shared machine
    falls on all of them alike."""
    for call in calls:
        call()  # warm-up: oneDNN / cuDNN / onnxruntime pick their kernels on the first call
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(runs):
        for call, t in zip(calls, times):
            sync()
            start = time.perf_counter()
            call()
            sync()
            t.append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


def _onnxruntime_calls(models: list[torch.nn.Module], shapes: list[tuple[int, ...]],
                       threads: int) -> list:
    """One call per model: the model exported as `dance export` writes it, run by an
    onnxruntime CPU session on ``threads`` threads with every graph optimisation on (which
    folds BatchNorm into the convolutions and fuses activations, as a deployment would)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise DanceError("--runtime onnxruntime needs onnxruntime: pip install onnxruntime") from None
    import numpy as np

    from dance.network.export import export
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    calls = []
    with tempfile.TemporaryDirectory(prefix="dance-bench-") as tmp:
        for i, (model, shape) in enumerate(zip(models, shapes)):
            path = export(model, Path(tmp) / f"model{i}.onnx", "onnx", input_shape=shape)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feed = {"image": np.random.default_rng(i).random(shape, dtype=np.float32)}
            calls.append(lambda session=session, feed=feed: session.run(None, feed))
    return calls


def latencies_ms(models: list[torch.nn.Module], shape: tuple[int, ...] | list[tuple[int, ...]],
                 runs: int, runtime: str = "torch", threads: int = 2) -> list[float | None]:
    """Median latency of each model (on one input ``shape``, or one shape per model), runs
    alternating (`_alternating_ms`). ``runtime``: ``torch`` (eager, inference mode, on the
    models' device and PyTorch's thread count) or ``onnxruntime`` (each model exported to ONNX
    and run on the CPU on ``threads`` threads: the deployed file's latency)."""
    if runs <= 0:
        return [None] * len(models)
    if runtime not in RUNTIMES:
        raise DanceError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    shapes = shape if isinstance(shape, list) else [shape] * len(models)
    device = next(models[0].parameters()).device
    if runtime == "onnxruntime":
        if device.type != "cpu":
            raise DanceError("--runtime onnxruntime times the exported models on the CPU; "
                             "use it with --device cpu")
        return _alternating_ms(_onnxruntime_calls(models, shapes, threads), runs)
    xs = [torch.rand(s, device=device) for s in shapes]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        return _alternating_ms([lambda m=m, x=x: m(x) for m, x in zip(models, xs)], runs, sync)


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


def slim_to(model: torch.nn.Module, fraction: float, shape: tuple[int, ...],
            memory_weight: float = 0.0) -> list[str]:
    """Slim ``model`` in place to ``fraction`` of its inference FLOPs at ``shape`` the way a
    training run's last pruning point would, from its weights alone (BatchNorm-scale channel
    importance, no probe batches, ``memory_weight`` as ``network_slimming.memory_weight``):
    what a channel-slimmed model of this family costs to run."""
    from dance.network.slimming import NetworkSlimmer
    slimmer = NetworkSlimmer(model, lam=0.0, prune_at=(1.0,), gate_threshold=0.0,
                             network_budget=fraction, importance="gate", input_shape=shape,
                             channels=True, channel_importance="bn_scale",
                             memory_weight=memory_weight)
    event = slimmer.prune(model, [], None, 1.0)
    n = sum(len(c["channels"]) for c in event.channels)
    return event.removed + ([f"{n} channels"] if n else [])


def _before_and_after(name: str, num_classes: int, dev: torch.device, shape: tuple[int, ...],
                      runs: int, network_budget: float | None = None,
                      memory_weight: float = 0.0, runtime: str = "torch",
                      threads: int = 2) -> dict:
    """One row of `bench_models`: ``name`` and its copy with the largest branches removed, or
    with ``network_budget``, slimmed (channels and branches) to that fraction of its FLOPs."""
    from dance.network.gates import remove_branches
    from dance.network.registry import build_model
    model = build_model(name, num_classes).eval().to(dev)
    slim = copy.deepcopy(model)
    if network_budget is not None:
        removed = slim_to(slim, network_budget, shape, memory_weight)
    else:
        removed = largest_branches(model, shape)
        remove_branches(slim, removed)
    before, after = model_size(model, shape), model_size(slim, shape)
    before["latency_ms"], after["latency_ms"] = latencies_ms([model, slim], shape, runs,
                                                             runtime, threads)
    return {"model": name, "removed": removed, "before": before, "after": after,
            "ratios": {k: (after[k] / before[k] if before[k] else None) for k in before}}


def bench_models(size: tuple[int, int] = (512, 1024), device: str = "cpu",
                 models: Sequence[str] | None = None, runs: int = 5, threads: int = 2,
                 num_classes: int = 19, network_budget: float | None = None,
                 memory_weight: float = 0.0, runtime: str = "torch") -> dict:
    """Params and GFLOPs (FlopCounterMode, multiply-add = 2) of each model and of a copy with
    the largest branch of each multi-scale module removed (with ``network_budget``: slimmed,
    channels and branches, to that fraction of its FLOPs, ``slim_to``, ranked with
    ``memory_weight``); latency: median of
    ``runs`` forwards (batch 1, eval, inference mode, fp32) after one warm-up, the two models
    alternating, in PyTorch or (``runtime``) onnxruntime."""
    from dance.engine.runtime import pick_device
    from dance.network.registry import list_models
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
            say(f"{name}")
            rows.append(_before_and_after(name, num_classes, dev, shape, runs, network_budget,
                                          memory_weight, runtime, threads))
    finally:
        torch.set_num_threads(threads_before)
    return {"bench": "models", "machine": finish_machine(machine),
            "setup": {"size": list(size), "runs": runs, "threads": threads,
                      "num_classes": num_classes, "network_budget": network_budget,
                      "memory_weight": memory_weight, "runtime": runtime},
            "models": rows}


def bench_deployed(compare_dir: str, size: tuple[int, int] | None = None, device: str = "cpu",
                   runs: int = 20, threads: int = 2, runtime: str = "torch") -> dict:
    """Params, GFLOPs and latency of the deployed model of every run kind of a `dance compare`
    folder (its first seed), timed side by side, with ratios to the baseline. Input: ``size``
    (default: the size the compare evaluated at); a ``lowres`` row runs the baseline model at its
    reduced scale of that size. The run folders are read from the compare folder's ``runs/``,
    so the folder may have been moved or copied, or be named from another directory."""
    import json

    from dance.engine.checkpoint import load_model
    from dance.engine.runtime import cpu_threads, pick_device
    report_file = Path(compare_dir) / "report.json"
    if not report_file.is_file():
        raise DanceError(f"{report_file}: not found; --compare takes a finished `dance compare` "
                         "folder")
    report = json.loads(report_file.read_text())
    dev = pick_device(device)
    machine = machine_info(dev)
    rows, models, shapes = [], [], []
    with cpu_threads(threads):
        for kind, dirs in report["run_dirs"].items():
            r = report["runs"][kind]
            h, w = size or tuple(report["runs"]["baseline"]["input_size"])
            scale = r.get("input_scale") or 1.0
            shape = (1, 3, max(1, round(h * scale)), max(1, round(w * scale)))
            model = load_model(Path(compare_dir) / "runs" / Path(dirs[0]).name).to(dev)
            models.append(model)
            shapes.append(shape)
            rows.append({"run": kind, "input": list(shape[2:]), **model_size(model, shape)})
        for row, ms in zip(rows, latencies_ms(models, shapes, runs, runtime, threads)):
            row["latency_ms"] = ms
    base = rows[0]
    for row in rows:
        row["ratios"] = {k: (row[k] / base[k] if base[k] else None)
                         for k in ("params_m", "gflops", "latency_ms")}
    return {"bench": "deployed", "machine": finish_machine(machine),
            "setup": {"compare": str(compare_dir), "runs": runs, "threads": threads,
                      "runtime": runtime, "seed": report["config"]["train"]["seed"]},
            "rows": rows}


def format_deployed(r: dict) -> str:
    def cell(row: dict, key: str, fmt: str) -> str:
        if row[key] is None:
            return "-"
        return f"{row[key]:{fmt}} ({row['ratios'][key]:.2f}×)"
    table = markdown_table(
        ["run", "input", "params (M)", "GFLOPs", "latency (ms, measured)"],
        [(row["run"], "x".join(map(str, row["input"])), cell(row, "params_m", ".3f"),
          cell(row, "gflops", ".3f"), cell(row, "latency_ms", ".2f")) for row in r["rows"]])
    s = r["setup"]
    return (f"Deployed models of {s['compare']} (seed {s['seed']} of each run: its first), batch 1, "
            f"{s['runs']} timed runs each (median, runs alternating), {s['threads']} CPU threads, "
            f"{_runtime_words(s)}; ratios to the baseline.\n{machine_line(r['machine'])}\n\n"
            f"{table}")


def _runtime_words(setup: dict) -> str:
    if setup.get("runtime") == "onnxruntime":
        return "onnxruntime (the exported ONNX files, every graph optimisation on)"
    return "PyTorch eager"


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
    what = (f"Each model slimmed to {s['network_budget']:g} of its FLOPs (channels and branches, "
            f"BatchNorm-scale importance, memory weight {s.get('memory_weight', 0.0):g}). "
            if s.get("network_budget") else "")
    return (f"{what}Input 1x3x{s['size'][0]}x{s['size'][1]}, {s['num_classes']} classes, "
            f"{s['runs']} timed runs (median), {s['threads']} CPU threads, "
            f"{_runtime_words(s)}.\n"
            f"{machine_line(r['machine'])}\n\n{table}")


def run(args: argparse.Namespace) -> int:
    """``dance bench models``: run it, print its table (or ``--json``)."""
    if args.compare:
        return show(args, bench_deployed(args.compare, args.size_given, args.device, args.runs,
                                         args.threads, args.runtime), format_deployed)
    names = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    result = bench_models(args.size_given or (512, 1024), args.device, names, args.runs,
                          args.threads, args.num_classes, args.network_budget,
                          args.memory_weight, args.runtime)
    return show(args, result, format_models)
