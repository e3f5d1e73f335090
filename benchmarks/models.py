"""Params, GFLOPs, latency before/after removing each model's largest branch: `dance bench models`."""
import sys

from dance.cli import main

sys.exit(main(["bench", "models", *sys.argv[1:]]))
