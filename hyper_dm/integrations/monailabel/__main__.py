"""Start the MONAI Label server with the Hyper-DM app, on 127.0.0.1 unless told otherwise (``hyper-dm-label`` is
the same as ``python -m hyper_dm.integrations.monailabel``).

    hyper-dm-label --studies studies/ --ckpt bundle/models/model.pt
    hyper-dm-label --studies knees/ --ckpt knee.pt \\
        --conf config bundle/configs/knee_singlecoil.yaml --conf max_M 8
    hyper-dm-label --app-folder     # print the app folder for `monailabel start_server`

It runs ``python -m monailabel.main start_server`` (what the ``monailabel`` command runs) with this Python, so the
virtual environment need not be activated; ``--dry-run`` prints the command instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["APP_FOLDER", "main", "server_command"]

APP_FOLDER = Path(__file__).resolve().parent / "app_folder"
"""The app folder to give ``monailabel start_server --app`` (MONAI Label adds logs/ and model/ to it)."""


def server_command(args: argparse.Namespace) -> list[str]:
    """The ``monailabel start_server`` command line for parsed launcher ``args``."""
    command = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(args.app),
               "--studies", str(Path(args.studies).resolve()), "--host", args.host, "--port", str(args.port),
               "--conf", "models", "hyperdm", "--conf", "ckpt", str(Path(args.ckpt).resolve())]
    for key, value in args.conf:
        command += ["--conf", key, value]
    return command


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyper-dm-label", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", help="folder of studies (NIfTI CT volumes; .h5 files for knee MRI)")
    parser.add_argument("--ckpt", help="the trained model (model.pt)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine "
                                                            "only; another needs --conf expose true)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="app setting (M, N, steps, max_M, max_N, max_steps, config, input_mode, device, "
                             "auto_score, expose)")
    parser.add_argument("--app", default=str(APP_FOLDER), help="MONAI Label app folder (default: the packaged one)")
    parser.add_argument("--app-folder", action="store_true", help="print the packaged app folder and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the server command instead of running it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.app_folder:
        print(APP_FOLDER)
        return 0
    if not args.studies or not args.ckpt:
        parser().error("--studies and --ckpt are required")
    if not Path(args.ckpt).is_file():
        parser().error(f"--ckpt {args.ckpt}: no such file; train first (see README) or give the model.pt path")
    command = server_command(args)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    os.execv(command[0], command)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
