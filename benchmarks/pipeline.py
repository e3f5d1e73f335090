"""Data-pipeline images/s at each data-plan scale vs full scale: `dance bench pipeline`."""
import sys

from dance.cli import main

sys.exit(main(["bench", "pipeline", *sys.argv[1:]]))
