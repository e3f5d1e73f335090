"""Data-pipeline images/s at each data-plan scale vs full scale: `dance bench pipeline`."""
import sys

from dance.bench import main

sys.exit(main(["pipeline", *sys.argv[1:]]))
