"""Seed-style entry point: `python scripts/train.py --config CONFIG [key.subkey=value ...]` (see `--help`)."""

import sys

from hyper_dm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
