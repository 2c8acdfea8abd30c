"""Seed-style command line: ``hyper-dm train|infer|export|findings`` (also ``scripts/train.py``, ``scripts/infer.py``,
``scripts/export.py``, ``scripts/findings.py``).

    hyper-dm train --config bundle/configs/ct_luna16.yaml --outdir runs/ct_eu training.mode=eu training.lr=1e-4
    hyper-dm infer --config bundle/configs/ct_luna16.yaml --ckpt bundle/models/model.pt --M 10 --N 10 \\
        --outdir results/ct/
    hyper-dm infer --config bundle/configs/ct_luna16.yaml --input my_fbp.nii.gz --mode measured
    hyper-dm export --config bundle/configs/ct_luna16.yaml --ckpt bundle/models/model.pt --input LUNA16/subset9/ \\
        --outdir data/recon_ct/ --annotations LUNA16/annotations.csv export.absent_series=ignore
    hyper-dm findings --export data/recon_ct/ --detections eval/result_luna16_fold0.json --eu-quantile 0.95

Each ``a.b=v`` becomes a bundle override (``training.*`` -> ``training_cfg#*``, ``inference.*`` ->
``inference_cfg#*``, ``export.*`` -> ``export_cfg#*``, ``findings.*`` -> ``findings_cfg#*``) and the same MONAI
bundle workflow runs as with ``python -m monai.bundle run``, on ``common.yaml`` + ``train.yaml``/``inference.yaml``
(+ ``export.yaml`` for export and findings) + ``--config``. Outputs go where the bundle's ``bundle_root``
says: ``bundle/models`` from the repository root, ``./models`` anywhere else.

Exit status: 0 done; 2 a fault of the input, the configuration or the output folder (one line on stderr);
3 (``infer`` with ``data.on_bad_file=skip``) some cases were skipped, listed in ``inference_summary.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from monai.bundle import ConfigWorkflow

from .config import BUNDLE_CONFIGS, ConfigError, check_literal, config_files_for, parse_overrides, validate_overrides
from .data.validation import BadInputError

__all__ = ["command_overrides", "main", "parse_args", "parser", "run_workflow"]

RUN_IDS = {"train": "training", "infer": "inference", "export": "export", "findings": "findings"}
WORKFLOW_TYPES = {"train": "train", "infer": "infer", "export": "infer", "findings": None}
"""MONAI's workflow type of each command (its required-property check); findings runs no network."""


def run_workflow(workflow: str, config_files: Sequence[str], overrides: dict[str, Any]) -> list[Any]:
    """Validate ``overrides`` against ``config_files`` and run the bundle workflow (``train``, ``infer``, ``export``
    or ``findings``); returns what its run expressions returned (for ``infer``: the skipped cases)."""
    validate_overrides(config_files, overrides)
    runner = ConfigWorkflow(
        config_file=list(config_files),
        meta_file=str(BUNDLE_CONFIGS / "metadata.json"),
        logging_file=str(BUNDLE_CONFIGS / "logging.conf"),
        run_id=RUN_IDS[workflow],
        workflow_type=WORKFLOW_TYPES[workflow],
        **overrides,
    )
    runner.initialize()
    result = runner.run()
    runner.finalize()
    return result


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyper-dm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("train", "train a HyperNetwork (bundle run id 'training')"),
                       ("infer", "reconstruct with EU/AU maps (bundle run id 'inference')"),
                       ("export", "reconstruct CT series for MONAI's lung nodule detection bundle: HU + EU/AU/total "
                                  "volumes on its grid and a datalist (bundle run id 'export')"),
                       ("findings", "EU/AU/total per detected box or labelled region of an export (bundle run id "
                                    "'findings')")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config", help="a bundle config or task overlay (e.g. bundle/configs/knee_singlecoil.yaml)")
        cmd.add_argument("overrides", nargs="*", help="key.subkey=value, e.g. training.lr=1e-4")
        cmd.add_argument("--allow-expressions", action="store_true",
                         help="let values starting with $ (Python), @ or %% (references) be evaluated by MONAI")
        if name == "findings":
            cmd.add_argument("--export", help="the export folder or its datalist.json (findings.export)")
            cmd.add_argument("--detections", help="the detection bundle's result JSON (findings.detections)")
            cmd.add_argument("--labels", help="a label volume on the exported grid, or a JSON of image/label pairs "
                                              "(findings.labels)")
            cmd.add_argument("--image", help="the exported image a single label volume belongs to (findings.image)")
            cmd.add_argument("--eu-threshold", type=float, help="EU threshold in HU^2 (findings.eu_threshold)")
            cmd.add_argument("--eu-quantile", type=float,
                             help="else this quantile of EU over the validation split (findings.eu_quantile)")
            cmd.add_argument("--reference", help="export whose validation split sets the quantile (findings.reference)")
            cmd.add_argument("--min-score", type=float, help="leave out detections scoring below (findings.min_score)")
            cmd.add_argument("--outdir", help="where findings.json/.csv go (findings.output_dir; default the export)")
            cmd.add_argument("--overwrite", action="store_true", help="replace earlier findings (findings.overwrite)")
        if name == "train":
            cmd.add_argument("--outdir", help="where model.pt, checkpoints/ and logs/ go (output_dir)")
            cmd.add_argument("--overwrite", action="store_true",
                             help="replace another run's model, checkpoints and logs there (training.overwrite)")
        if name in ("infer", "export"):
            cmd.add_argument("--input", help="a volume file, DICOM folder, folder of volumes or datalist JSON "
                                             "(inference.input; default: the test split of data.dataset_dir)")
            cmd.add_argument("--mode", choices=["simulate", "measured"],
                             help="simulate the measurement from a full-dose input, or take the input as measured "
                                  "(inference.input_mode)")
            cmd.add_argument("--ckpt", help="checkpoint to load (inference.ckpt)")
            cmd.add_argument("--M", type=int, help="weight sets per input (inference.M)")
            cmd.add_argument("--N", type=int, help="DDIM draws per weight set (inference.N)")
            cmd.add_argument("--outdir", help="output folder (inference.outdir)")
            cmd.add_argument("--overwrite", action="store_true", help="replace earlier results (inference.overwrite)")
        if name == "export":
            cmd.add_argument("--annotations", help="LUNA16 annotations.csv: boxes and labels in the datalist "
                                                   "(export.annotations)")
    return parser


def command_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Bundle overrides from ``key.subkey=value`` arguments and the command's flags (``--ckpt/--M/...``), each a
    literal unless ``--allow-expressions``."""
    overrides = parse_overrides(args.overrides, args.allow_expressions)
    flags: dict[str, Any] = {}
    if args.command in ("infer", "export"):
        flags.update({f"inference_cfg#{k}": v for k, v in {
            "input": args.input, "input_mode": args.mode, "ckpt": args.ckpt, "M": args.M, "N": args.N,
            "outdir": args.outdir, "overwrite": True if args.overwrite else None}.items()})
    if args.command == "train":
        flags.update({"output_dir": args.outdir, "training_cfg#overwrite": True if args.overwrite else None})
    if args.command == "export":
        flags["export_cfg#annotations"] = args.annotations
    if args.command == "findings":
        flags.update({f"findings_cfg#{k}": v for k, v in {
            "export": args.export, "detections": args.detections, "labels": args.labels, "image": args.image,
            "eu_threshold": args.eu_threshold, "eu_quantile": args.eu_quantile, "reference": args.reference,
            "min_score": args.min_score, "output_dir": args.outdir,
            "overwrite": True if args.overwrite else None}.items()})
    for key, value in flags.items():
        if value is not None:
            if not args.allow_expressions:
                check_literal(key, value)
            overrides[key] = value
    return overrides


USER_ERRORS = (ConfigError, BadInputError, FileExistsError, FileNotFoundError)
"""Faults of the input, the configuration or the output folder: reported as one line, not a traceback."""


def user_error(err: BaseException) -> BaseException | None:
    """The user-facing fault behind ``err`` (MONAI wraps it in ``RuntimeError("Failed to evaluate ...")``)."""
    while err is not None:
        if isinstance(err, USER_ERRORS):
            return err
        err = err.__cause__ or err.__context__
    return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides allowed both before and after the flags."""
    cli = parser()
    args, extra = cli.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        cli.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides += extra
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run_workflow(args.command, config_files_for(args.command, args.config), command_overrides(args))
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        logging.getLogger("hyper_dm").error("%s", cause)
        print(f"hyper-dm {args.command}: error: {cause}", file=sys.stderr)
        return 2
    if args.command == "infer" and any(result):
        print(f"hyper-dm infer: {len(result[0])} case(s) skipped (see the log and inference_summary.json)",
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
