"""Plain vs DANCE training: `dance bench train` with this script's GPU-sized defaults (r50 at
512x1024, 96 images x 3 epochs, 8 loader workers, runs kept in ./gpu-bench); flags override.

    python benchmarks/gpu_train.py                      # on a GPU: about 5 minutes on an H200
    python benchmarks/gpu_train.py --device cpu --tiny  # the same path on a CPU, in seconds

It prints, side by side and as DANCE/plain: images/s, wall time, training FLOPs, energy (NVML
where the GPU has it, labelled "measured"), seconds by phase and step time by input shape.
``--tiny`` swaps in the demo's small model, 64x128 images, 16 images x 1 epoch, no workers.
"""
import sys

from dance.cli import main

GPU = ["--model", "deeplabv3plus_r50", "--size", "512x1024", "--train", "96", "--epochs", "3",
       "--workers", "8", "--out", "gpu-bench"]
TINY = ["--model", "deeplabv3plus_mbv2", "--size", "64x128", "--train", "16", "--val", "4",
        "--epochs", "1", "--batch", "4", "--workers", "0"]


def argv(args: list[str]) -> list[str]:
    """The `dance bench train` command line: the defaults, --tiny's, then the caller's flags
    (the last of a repeated flag wins)."""
    tiny = "--tiny" in args
    return ["bench", "train", *GPU, *(TINY if tiny else []), *(a for a in args if a != "--tiny")]


if __name__ == "__main__":
    sys.exit(main(argv(sys.argv[1:])))
