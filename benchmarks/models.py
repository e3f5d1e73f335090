"""Params, GFLOPs, latency before/after removing each model's largest branch: `dance bench models`."""
import sys

from dance.bench import main

sys.exit(main(["models", *sys.argv[1:]]))
