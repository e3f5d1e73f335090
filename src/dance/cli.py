"""``dance`` command line (docs/cli.md).

Every command exits 0 on success and non-zero with a one-line reason on failure; ``--verbose``
shows the traceback. Each command's work lives in the library module named in its handler.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from dance.data.complexity import INDICATORS
from dance.data.datasets import DATASETS
from dance.errors import DanceError
from dance.report.compare import RUN_KINDS


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 256x512, got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return v


def _int_at_least(low: int):
    """A parser of integers >= ``low``."""
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
    import re
    if text not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def _model_options(text: str) -> dict:
    import json
    try:
        v = json.loads(text)
    except json.JSONDecodeError:
        v = None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as "
                                         f"'{{\"width_mult\": 0.5}}', got {text!r}")
    return v


def _budget(text: str) -> float:
    from dance.data.plan import check_budget
    try:
        return check_budget(float(text))
    except (ValueError, DanceError) as e:
        raise argparse.ArgumentTypeError(str(e) if isinstance(e, DanceError)
                                         else f"expected a number, got {text!r}") from None


class _BadOptions(DanceError):
    """A bad option of ``dance COMMAND``, reported as one line with exit status 1 (not argparse's
    usage and exit 2): `dance bench`'s parsers raise it, for the scripts that run benchmarks."""

    def __init__(self, command: str, message: str):
        super().__init__(message)
        self.command = command


def _one_line_errors(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``p`` raises `_BadOptions` on a bad option; ``main`` prints it as ``dance bench: error:
    pipeline: argument --n: ...``."""
    def error(message: str):
        _, command, *where = p.prog.split()  # "dance bench pipeline"
        raise _BadOptions(command, f"{' '.join(where)}: {message}" if where else message)
    p.error = error  # type: ignore[method-assign]
    return p


def _dataset_args(p: argparse.ArgumentParser, split_default: str | None = "train") -> None:
    p.add_argument("--dataset", required=True, choices=DATASETS, help="dataset layout (docs/datasets.md)")
    p.add_argument("--root", required=True, help="folder the dataset was downloaded or unpacked to")
    p.add_argument("--split", default=split_default, choices=("train", "val", "test"))


def _bench_commands(sub) -> None:
    """``dance bench SUBCOMMAND``: one sub-parser per benchmark module of `dance.bench`, whose
    ``run`` handles it; their bad options are one-line errors (`_one_line_errors`)."""
    def parser(action, name: str, help: str) -> argparse.ArgumentParser:
        p = action.add_parser(name, help=help, description=help)
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks on errors")
        return _one_line_errors(p)

    bench = parser(sub, "bench", "benchmarks printing ratios measured side by side in one run, "
                   "on the machine they name (dance bench SUBCOMMAND --help)")
    bench = bench.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = parser(bench, name, help)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(handler=f"dance.bench.{name}:run")
        return p

    p = command("complexity", "`dance score` throughput vs decode-only; indicators vs label_aliasing")
    p.add_argument("--n", type=_int_at_least(2), default=500, help="SynthStreets images")
    p.add_argument("--size", type=_size, default=(256, 512), help="HxW of the images")
    p.add_argument("--workers", type=_int_at_least(0), default=None,
                   help="processes (default: all cores)")
    p.add_argument("--repeats", type=_int_at_least(1), default=3,
                   help="alternating rounds, best kept")
    p.add_argument("--data", default=None, help="SynthStreets root (generated if incomplete)")

    p = command("models", "params, GFLOPs, latency before/after removing each model's largest "
                          "branch, or of every deployed model of a compare (--compare)")
    p.add_argument("--size", dest="size_given", type=_size, default=None,
                   help="HxW of the input (default 512x1024; with --compare, the compare's size)")
    p.add_argument("--compare", default=None,
                   help="a `dance compare` folder: time the deployed model of each of its runs")
    p.add_argument("--network-budget", type=float, default=None,
                   help="instead of removing the largest branches, slim each model (channels "
                        "and branches) to this fraction of its FLOPs")
    p.add_argument("--memory-weight", type=float, default=0.0,
                   help="with --network-budget: rank channels and branches by GFLOPs plus this "
                        "many GFLOPs per million activation elements they move "
                        "(network_slimming.memory_weight)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--models", default=None, help="comma-separated (default: all)")
    p.add_argument("--runs", type=_int_at_least(0), default=5,
                   help="timed runs per model (0: params and GFLOPs only)")
    p.add_argument("--threads", type=_int_at_least(1), default=2, help="CPU threads")
    p.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                   help="time the models in PyTorch (eager) or as exported ONNX files in "
                        "onnxruntime on the CPU (BatchNorm folded, activations fused)")
    p.add_argument("--num-classes", type=_int_at_least(1), default=19, help="output classes")

    def training_run(p: argparse.ArgumentParser, size: tuple[int, int], train: int) -> None:
        """The options of a benchmark that trains SynthStreets runs."""
        p.add_argument("--model", default="deeplabv3plus_mbv2", help="model name (as model.name)")
        p.add_argument("--model-options", type=_model_options, default=None,
                       help="JSON builder options (default: the demo's small ones for its model)")
        p.add_argument("--size", type=_size, default=size, help="HxW of images and crop")
        p.add_argument("--train", type=_int_at_least(2), default=train, help="training images")
        p.add_argument("--epochs", type=_int_at_least(1), default=2, help="epochs of each run")
        p.add_argument("--batch", type=_int_at_least(1), default=8, help="batch size")
        p.add_argument("--workers", type=_int_at_least(0), default=1,
                       help="loader processes per run")

    p = command("train", "plain vs DANCE training side by side: images/s, wall time, FLOPs, energy")
    training_run(p, (128, 256), 64)
    p.add_argument("--val", type=_int_at_least(1), default=8, help="validation images")
    p.add_argument("--budget", type=_budget, default=0.5, help="DANCE's data budget")
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", default=None,
                   help="keep the runs and results.json here (default: a temp folder)")
    p.add_argument("--data", default=None, help="SynthStreets root (default: OUT/data)")

    p = command("threads", "training images/s of the machine at each CPU thread count, and with "
                "one one-thread run per core side by side (compare --jobs)")
    training_run(p, (64, 128), 96)
    p.add_argument("--data", default=None, help="SynthStreets root (generated if incomplete)")

    p = command("pipeline", "data-pipeline images/s at each data-plan scale vs full scale and "
                "decode-only")
    p.add_argument("--n", type=_int_at_least(2), default=64, help="SynthStreets images")
    p.add_argument("--size", type=_size, default=(256, 512), help="HxW of the images")
    p.add_argument("--crop", type=_size, default=(256, 512), help="training crop HxW")
    p.add_argument("--workers", type=_int_at_least(0), default=1, help="loader processes")
    p.add_argument("--batch", type=_int_at_least(1), default=8, help="batch size")
    p.add_argument("--repeats", type=_int_at_least(1), default=3,
                   help="alternating rounds, best kept")
    p.add_argument("--data", default=None, help="SynthStreets root (generated if incomplete)")
    p.add_argument("--format", dest="fmt", choices=("png", "jpeg"), default="png",
                   help="how the images are stored: png (as SynthStreets), or jpeg (quality 90, "
                        "decoded at the smallest DCT scale each sample needs)")
    p.add_argument("--decode-cache", action="store_true",
                   help="read through a decode cache next to the data, as train.decode_cache "
                        "does (masks, and PNG images at 1/1, 1/2 and 1/4 size, decoded once)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dance",
        description="DANCE: complexity-guided data slimming and progressive network slimming "
                    "for cheaper semantic-segmentation training and inference.",
    )
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    from dance import __version__
    parser.add_argument("--version", action="version", version=f"dance {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks on errors")
        p.set_defaults(handler=handler)
        return p

    p = command("synth", "dance.data.synth:cli_synth",
                "generate SynthStreets, procedural street scenes in the Cityscapes layout")
    p.add_argument("--out", required=True, help="output folder (the dataset root)")
    p.add_argument("--train", type=_positive_int, default=300, help="training images")
    p.add_argument("--val", type=_positive_int, default=100, help="validation images")
    p.add_argument("--test", type=_positive_int, default=0, help="test images")
    p.add_argument("--size", type=_size, default=(256, 512), help="HxW, e.g. 256x512")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--style", default="streets",
                   help="scene family: streets (city streets by day) or suburb-dusk (low houses "
                        "and trees under dim dusk light)")
    p.add_argument("--workers", type=_int_at_least(0), default=None,
                   help="processes (default: all cores)")

    p = command("check-data", "dance.data.check:cli_check_data",
                "validate a dataset split up front; exits 1 if it finds problems")
    _dataset_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--workers", type=_int_at_least(0), default=None,
                   help="processes (default: all cores)")

    p = command("score", "dance.data.scoring:cli_score",
                "score every image of a split by spatial complexity (cached)")
    _dataset_args(p)
    p.add_argument("--indicator", default="si",
                   help=f"one or more (comma-separated) of {', '.join(INDICATORS)}")
    p.add_argument("--out", default=None, help="CSV file (id,path,indicator,score)")
    p.add_argument("--cache", default=None, help="score cache file (default: beside --out)")
    p.add_argument("--workers", type=_int_at_least(0), default=None,
                   help="processes (default: all cores)")

    p = command("plan", "dance.data.plan:cli_plan",
                "plan data slimming (scales, drops, loss weights) for a training budget")
    p.add_argument("--scores", required=True, help="CSV written by `dance score`")
    p.add_argument("--budget", required=True, help="training compute as a fraction of a plain run")
    p.add_argument("--indicator", default=None, help="which indicator of the CSV (default: first)")
    p.add_argument("--config", default=None,
                   help="take the data_slimming settings (policy, schedule, drop...) of this "
                        "config file or ready config (default: those dance train uses)")
    p.add_argument("--out", default=None, help="also write the plan as JSON to this file")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("configs", "dance.engine.config:cli_configs",
                "list the ready configs (dance train --config NAME), or print one")
    p.add_argument("name", nargs="?", default=None, help="print this config's file")

    p = command("train", "dance.engine.train:cli_train",
                "train one run (plain, or DANCE when slimming is enabled in the config)")
    p.add_argument("--config", required=True,
                   help="YAML config file, or a ready config's name (dance configs lists them); "
                        "sections and keys: docs/cli.md#config")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.epochs=2 data_slimming.budget=0.4")
    p.add_argument("--out", default=None, help="run folder (metrics.json, checkpoint/)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run's checkpoint (refused if the config or dataset "
                        "changed since the run started)")
    p.add_argument("--force", action="store_true",
                   help="with --resume: continue even though the config or dataset changed "
                        "(recorded in metrics.json as forced_resume)")
    p.add_argument("--on-bad-sample", choices=("error", "skip"), default=None,
                   help="stop on a bad training file, or skip it (logged once, counted in "
                        "metrics.json); default: train.on_bad_sample of the config")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = command("eval", "dance.engine.inference:cli_eval",
                "evaluate a trained run or checkpoint on a dataset split")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    _dataset_args(p, split_default="val")
    p.add_argument("--mode", choices=("whole", "slide"), default=None,
                   help="whole-image or sliding-window inference (default: as trained)")
    p.add_argument("--crop", type=_size, default=None, help="sliding-window size HxW")
    p.add_argument("--adaptive-resolution", action="store_true",
                   help="complexity-guided input resolution: simpler images at lower resolution "
                        "(docs/method.md#adaptive-inference-resolution)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("predict", "dance.engine.inference:cli_predict",
                "segment a folder of images with a trained run: label PNGs and colour overlays")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    p.add_argument("--images", required=True, help="folder of images (searched at any depth)")
    p.add_argument("--out", required=True, help="output folder (mirrors the images' folders)")
    p.add_argument("--adaptive-resolution", action="store_true",
                   help="complexity-guided input resolution: simpler images at lower resolution")
    p.add_argument("--mode", choices=("whole", "slide"), default=None,
                   help="whole-image or sliding-window inference (default: as trained)")
    p.add_argument("--crop", type=_size, default=None, help="sliding-window size HxW")
    p.add_argument("--device", type=_device, default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command("export", "dance.engine.inference:cli_export",
                "export a trained (slimmed) model to ONNX or TorchScript")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    p.add_argument("--out", required=True, help="output file")

    p = command("compare", "dance.report.compare:cli_compare",
                "train DANCE side by side with the plain run and the alternatives; write a report")
    p.add_argument("--config", required=True,
                   help="YAML config file, or a ready config's name (dance configs lists them)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    p.add_argument("--runs", default=None,
                   help=f"comma-separated run kinds (baseline is always included); default: "
                        f"{','.join(RUN_KINDS)} (thin only with a network budget)")
    p.add_argument("--seeds", type=int, default=1, help="repeat every run with N seeds")
    p.add_argument("--saturation", action="store_true",
                   help="instead: train the plain recipe at 0.5x, 1x and 2x its epochs and say "
                        "how far the 1x run is from converged")
    p.add_argument("--jobs", type=int, default=1,
                   help="train N runs at a time, each in its own process with 1/N of the CPU "
                        "cores as threads (CPU: small models train faster this way)")
    p.add_argument("--out", default=None, help="report folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = command("demo", "dance.report.demo:cli_demo",
                "SynthStreets + compare (baseline, uniform, dance at budget 0.5): the embedded default")
    p.add_argument("--out", default="dance-demo", help="output folder (data, runs, report)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    _bench_commands(sub)

    return parser


# What an interrupted command leaves, said on its one line (nothing is half-written: every file
# is replaced atomically, and a run's last checkpoint stays whole)
_INTERRUPTED = {
    "train": "interrupted; continue with --resume (same --config and --out)",
    "compare": "interrupted; rerun the same command to continue (finished runs are reused, "
               "unfinished ones resumed)",
    "demo": "interrupted; rerun dance demo to continue (finished runs are reused, unfinished "
            "ones resumed)",
    "score": "interrupted; the scores computed so far are cached, rerun to continue",
}


def _one_line_warnings(command: str):
    """``warnings.showwarning`` printing dance's own warnings as ``dance CMD: warning: ...``,
    one line like its errors; other libraries' warnings keep Python's format."""
    import warnings
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("dance."):
            print(f"dance {command}: warning: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def _terminate_as_interrupt(signum, frame) -> None:
    """SIGTERM (a batch scheduler's stop, ``kill``) unwinds like Ctrl-C: same line, same exit
    status, the same files left whole."""
    raise KeyboardInterrupt


def _run(args: argparse.Namespace) -> int:
    module, func = args.handler.split(":")
    handler = getattr(importlib.import_module(module), func)
    rc = handler(args)
    return 0 if rc is None else int(rc)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except _BadOptions as e:
        print(f"dance {e.command}: error: {e}", file=sys.stderr)
        return 1
    import signal
    import threading
    import warnings
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    shown, warnings.showwarning = warnings.showwarning, _one_line_warnings(args.command)
    try:
        rc = _run(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return rc
    except DanceError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"dance {args.command}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `dance plan --json | head`: the reader has gone, so be quiet
        import os
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit would fail again
        return 141  # 128 + SIGPIPE, what the shell reports for a program a pipe stopped
    except KeyboardInterrupt:
        print(f"dance {args.command}: {_INTERRUPTED.get(args.command, 'interrupted')}",
              file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not a user error: still one line unless --verbose
        if args.verbose:
            traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"dance {args.command}: internal error: {type(e).__name__}: {msg} "
              "(rerun with --verbose for the traceback)", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = shown
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
