"""Training images/s at each CPU thread count vs one-thread runs side by side: `dance bench threads`."""
import sys

from dance.cli import main

sys.exit(main(["bench", "threads", *sys.argv[1:]]))
