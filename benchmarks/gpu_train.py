"""Plain vs DANCE training: `dance bench train` with this script's GPU-sized defaults (r50 at
512x1024, 96 images x 3 epochs, 8 loader workers, runs kept in ./gpu-bench); flags override."""
import sys

from dance.cli import main

sys.exit(main(["bench", "train", "--model", "deeplabv3plus_r50", "--size", "512x1024",
               "--train", "96", "--epochs", "3", "--workers", "8", "--out", "gpu-bench",
               *sys.argv[1:]]))
