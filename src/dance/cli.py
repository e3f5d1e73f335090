"""``dance`` command line (SPEC §4).

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


def _dataset_args(p: argparse.ArgumentParser, split_default: str | None = "train") -> None:
    p.add_argument("--dataset", required=True, choices=DATASETS, help="dataset layout (SPEC §3)")
    p.add_argument("--root", required=True, help="folder the dataset was downloaded or unpacked to")
    p.add_argument("--split", default=split_default, choices=("train", "val", "test"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dance",
        description="DANCE: complexity-guided data slimming and progressive network slimming "
                    "for cheaper semantic-segmentation training and inference.",
    )
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
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
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")

    p = command("check-data", "dance.data.check:cli_check_data",
                "validate a dataset split up front; exits 1 if it finds problems")
    _dataset_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("score", "dance.data.scoring:cli_score",
                "score every image of a split by spatial complexity (cached)")
    _dataset_args(p)
    p.add_argument("--indicator", default="si",
                   help=f"one or more (comma-separated) of {', '.join(INDICATORS)}")
    p.add_argument("--out", default=None, help="CSV file (id,path,indicator,score)")
    p.add_argument("--cache", default=None, help="score cache file (default: beside --out)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")

    p = command("plan", "dance.data.plan:cli_plan",
                "plan data slimming (scales, drops, loss weights) for a training budget")
    p.add_argument("--scores", required=True, help="CSV written by `dance score`")
    p.add_argument("--budget", required=True, help="training compute as a fraction of a plain run")
    p.add_argument("--indicator", default=None, help="which indicator of the CSV (default: first)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("train", "dance.engine.train:cli_train",
                "train one run (plain, or DANCE when slimming is enabled in the config)")
    p.add_argument("--config", required=True, help="YAML config (SPEC §4 shape)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.epochs=2 data_slimming.budget=0.4")
    p.add_argument("--out", default=None, help="run folder (metrics.json, checkpoint/)")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
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
                   help="complexity-guided input resolution (SPEC §1.5)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("export", "dance.engine.inference:cli_export",
                "export a trained (slimmed) model to ONNX or TorchScript")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    p.add_argument("--out", required=True, help="output file")

    p = command("compare", "dance.report.compare:cli_compare",
                "train DANCE side by side with the plain run and the alternatives; write a report")
    p.add_argument("--config", required=True, help="YAML config (SPEC §4 shape)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    p.add_argument("--runs", default="baseline,uniform,progressive,shuffled,data,network,dance",
                   help="comma-separated run kinds (baseline is always included)")
    p.add_argument("--seeds", type=int, default=1, help="repeat every run with N seeds")
    p.add_argument("--out", default=None, help="report folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = command("demo", "dance.report.demo:cli_demo",
                "SynthStreets + compare (baseline, uniform, dance at budget 0.5): the embedded default")
    p.add_argument("--out", default="dance-demo", help="output folder (data, runs, report)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = command("bench", "dance.bench:cli_bench",
                "benchmarks printing ratios measured side by side in one run: complexity, "
                "models, train, pipeline (dance bench SUBCOMMAND --help)")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="SUBCOMMAND ...",
                   help="complexity | models | train | pipeline, then its options")

    return parser


def _run(args: argparse.Namespace) -> int:
    module, func = args.handler.split(":")
    handler = getattr(importlib.import_module(module), func)
    rc = handler(args)
    return 0 if rc is None else int(rc)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except DanceError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"dance {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dance {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not a user error: still one line unless --verbose
        if args.verbose:
            traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"dance {args.command}: internal error: {type(e).__name__}: {msg} "
              "(rerun with --verbose for the traceback)", file=sys.stderr)
        return 1
