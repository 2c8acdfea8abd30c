"""Seed-style entry point: `python scripts/infer.py --config CONFIG [key.subkey=value ...]` (see `--help`)."""

import sys

from hyper_dm.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
