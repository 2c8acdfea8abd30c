"""Seed-style entry point: `python scripts/export.py --config CONFIG [key.subkey=value ...]` (see `--help`)."""

import sys

from hyper_dm.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
