"""The deep-ensemble baseline as one checkpoint: K models trained apart (other ``training_cfg#seed``), combined::

    python scripts/ensemble.py --members runs/s0/model.pt runs/s1/model.pt runs/s2/model.pt --to runs/ensemble/model.pt

The result loads wherever a model does, with ``model#ensemble_members`` K (a checkpoint is checked against the
config, so forgetting it is an error naming the key): ``--model#ensemble_members 3`` on ``python -m monai.bundle
run inference`` / ``calibrate`` / ``evaluate``, ``model.ensemble_members=3`` for ``scripts/evaluate.py`` and
``scripts/infer.py``. Weight set ``i`` of ``M`` comes from member ``i mod K``: ``M = K`` gives each member one, as the
Hyper-DM paper's ensemble (EU is the spread across members). Calibrate it like any model: the calibration of a member
does not describe the ensemble.
"""

from __future__ import annotations

import argparse
import sys

from hyper_dm.engines import write_ensemble


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", nargs="+", required=True, help="the members' model.pt files (two or more)")
    parser.add_argument("--to", required=True, help="the ensemble checkpoint to write")
    args = parser.parse_args(argv)
    record = write_ensemble(args.members, args.to)
    print(f"wrote {args.to}: a deep ensemble of {len(args.members)} members ({record['data']['task']}); load it with "
          f"model#ensemble_members {len(args.members)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
