"""`dance score` throughput vs decode-only; indicators vs label_aliasing: `dance bench complexity`."""
import sys

from dance.cli import main

sys.exit(main(["bench", "complexity", *sys.argv[1:]]))
