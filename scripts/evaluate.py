"""Evaluate a trained model the way the Hyper-DM paper does and write ``report.md`` with its plots
(:mod:`hyper_dm.evaluation` says what is measured; the bundle's ``evaluate`` run id does the same)::

    python scripts/evaluate.py --ckpt bundle/models/model.pt --out docs/           # synthetic test split
    python scripts/evaluate.py --ckpt model.pt --config bundle/configs/ct_luna16.yaml data.dataset_dir=/data/LUNA16
    python scripts/evaluate.py --ckpt knee.pt --config bundle/configs/knee_singlecoil.yaml --out docs/mri/
    python scripts/evaluate.py --ckpt ens/model.pt --M 3 model.ensemble_members=3    # a deep ensemble (ensemble.py)
"""

from __future__ import annotations

import argparse
import sys

from hyper_dm.config import parse_overrides
from hyper_dm.evaluation import evaluate, write_report
from hyper_dm.inference import HyperDM


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--config", help="a task overlay (e.g. bundle/configs/ct_luna16.yaml)")
    parser.add_argument("--calibration", help="calibration.json fitted by the 'calibrate' run id (default: the one "
                                              "beside --ckpt, if there is one)")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--M", type=int, default=4)
    parser.add_argument("--N", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: diffusion.ddim_steps)")
    parser.add_argument("--label", default="", help="a line describing the model and its training budget")
    parser.add_argument("--cases", type=int, default=None, help="evaluate the first K test cases (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="runs (other weight sets) of each case with an object, "
                                                                  "whose mean EU map gives its EU ratio")
    parser.add_argument("overrides", nargs="*", help="key.subkey=value, e.g. data.dataset_dir=/data/LUNA16")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    model = HyperDM.from_bundle(args.ckpt, config=args.config, calibration=args.calibration,
                                **parse_overrides(args.overrides))
    results = evaluate(model.reconstructor(args.M, args.N, args.steps), model.data, model.calibration, args.cases,
                       args.repeats)
    command = " ".join(["python scripts/evaluate.py", f"--ckpt {args.ckpt}",
                        *([f"--config {args.config}"] if args.config else []),
                        *([f"--calibration {args.calibration}"] if args.calibration else []),
                        f"--M {args.M} --N {args.N}", *([f"--steps {args.steps}"] if args.steps else []),
                        *([f"--cases {args.cases}"] if args.cases else []),
                        *([f"--repeats {args.repeats}"] if args.repeats != parser.get_default("repeats") else []),
                        *args.overrides])
    print(f"wrote {write_report(args.out, results, model.data, command, args.label)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
