"""`dance score` throughput vs decode-only; indicators vs label_aliasing: `dance bench complexity`."""
import sys

from dance.bench import main

sys.exit(main(["complexity", *sys.argv[1:]]))
