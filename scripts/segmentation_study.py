"""Nodule segmentation study: Dice of one MONAI U-Net per input variant (reference | fbp | hyperdm | hyperdm_eu_au).

Runs the product's own commands (printed, and written into the report): a synthetic LUNA16-format set (unless
``--dataset`` names one), the bundle's ``inference`` run id over every series (simulate mode, ``write_cond`` for the
FBP), then ``segmentation_train`` and ``segmentation_evaluate`` of ``bundle/configs/segmentation.yaml`` for each
variant with the same seed and budget. Writes ``{outdir}/segmentation_study.json`` and the markdown report
(default ``docs/segmentation.md``)::

    python scripts/segmentation_study.py                       # CPU scale: 10 synthetic series, 128 x 128
    python scripts/segmentation_study.py --dataset data/LUNA16 --M 8 --N 8 --steps 20 --epochs 300
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hyper_dm.data.luna16 import read_annotations  # noqa: E402
from hyper_dm.data.synthetic import write_luna16_like  # noqa: E402
from hyper_dm.io import atomic_write  # noqa: E402
from hyper_dm.segmentation import Variant  # noqa: E402

CONFIGS = "['bundle/configs/common.yaml','bundle/configs/{}.yaml']"


def bundle(run_id: str, workflow: str, overrides: dict, log: Path) -> tuple[str, float]:
    """Run ``python -m monai.bundle run <run_id>`` from the repository root; return the command and its seconds."""
    args = ["-m", "monai.bundle", "run", run_id, "--config_file", CONFIGS.format(workflow)]
    args += [x for k, v in overrides.items() for x in (f"--{k}", str(v))]
    command = f'python -m monai.bundle run {run_id} --config_file "{CONFIGS.format(workflow)}" ' + " ".join(
        f"--{k} {shlex.quote(str(v))}" for k, v in overrides.items())
    print(command, flush=True)
    start = time.perf_counter()
    with open(log, "a") as f:
        done = subprocess.run([sys.executable, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"failed (exit {done.returncode}): {command}; see {log}")
    return command, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outdir", default="bundle/models/segmentation_study")
    parser.add_argument("--dataset", default=None, help="a LUNA16-format folder (default: a synthetic one in outdir)")
    parser.add_argument("--n-series", type=int, default=10)
    parser.add_argument("--size", type=int, default=128, help="synthetic in-plane matrix")
    parser.add_argument("--ckpt", default="bundle/models/model.pt")
    parser.add_argument("--M", type=int, default=2)
    parser.add_argument("--N", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="DDIM steps")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", default="docs/segmentation.md")
    args = parser.parse_args()

    out = Path(args.outdir)  # relative paths: to the repository root, where the commands run
    (REPO / out).mkdir(parents=True, exist_ok=True)
    log = REPO / out / "study.log"
    dataset = Path(args.dataset) if args.dataset else out / "luna16"
    scale = f"dataset {dataset}"
    if args.dataset is None:
        scale = (f"synthetic LUNA16-format set: {args.n_series} series (write_luna16_like seed 1), {args.size} x "
                 f"{args.size} x 12-16 slices, 2.6-2.8 mm pixels, 2.0-2.5 mm slices")
        if not (REPO / dataset / "annotations.csv").is_file():
            write_luna16_like(REPO / dataset, n_series=args.n_series, seed=1, size_xy=args.size, n_slices=(12, 16),
                              spacing_xy_mm=(2.6, 2.8), spacing_z_mm=(2.0, 2.5))
    recon = out / "recon"
    commands, seconds = [], {}
    command, seconds["inference"] = bundle("inference", "inference", {
        "data#dataset_dir": dataset, "inference_cfg#input": dataset, "inference_cfg#outdir": recon,
        "inference_cfg#ckpt": args.ckpt, "inference_cfg#M": args.M, "inference_cfg#N": args.N,
        "diffusion#ddim_steps": args.steps, "inference_cfg#write_cond": True, "inference_cfg#skip_existing": True}, log)
    commands.append(command)
    results = {}
    for variant in Variant:
        common = {"data#dataset_dir": dataset, "segmentation_cfg#variant": variant.value,
                  "segmentation_cfg#reconstructions": recon, "segmentation_cfg#workdir": out / "segmentation",
                  "segmentation_cfg#epochs": args.epochs, "segmentation_cfg#seed": args.seed}
        for run_id in ("segmentation_train", "segmentation_evaluate"):
            command, seconds[f"{variant.value} {run_id}"] = bundle(run_id, "segmentation", common, log)
            commands.append(command)
        eval_dir = REPO / out / "segmentation" / variant.value / "eval"
        with open(eval_dir / "val_mean_dice_raw.csv") as f:
            per_case = {row["filename"]: float(row["class0"]) for row in csv.DictReader(f)}
        results[variant.value] = {"dice": sum(per_case.values()) / len(per_case), "per_case": per_case,
                                  "channels": variant.in_channels}
    study = {"scale": scale, "reconstruction": {"ckpt": args.ckpt, "M": args.M, "N": args.N, "ddim_steps": args.steps},
             "training": {"epochs": args.epochs, "seed": args.seed, "config": "bundle/configs/segmentation.yaml"},
             "seconds": {k: round(v, 1) for k, v in seconds.items()}, "commands": commands, "results": results}
    with atomic_write(REPO / out / "segmentation_study.json") as tmp:
        tmp.write_text(json.dumps(study, indent=2) + "\n")
    cases = list(next(iter(results.values()))["per_case"])
    rows = "\n".join(f"| {name} | {r['channels']} | {r['dice']:.3f} | "
                     + " | ".join(f"{r['per_case'][c]:.3f}" for c in cases) + " |" for name, r in results.items())
    nodules = read_annotations(REPO / dataset / "annotations.csv")
    sizes = "; ".join(f"{c[-8:]}: " + ", ".join(f"{n['diameter_mm']:.1f}" for n in nodules.get(c, [])) + " mm"
                      for c in cases)
    report = REPO / args.report
    with atomic_write(report) as tmp:
        tmp.write_text(f"""# Nodule segmentation on Hyper-DM outputs

Does reconstruction, and knowing its uncertainty, change what a nodule model finds? One MONAI 3-D U-Net per input
variant, trained and evaluated with `bundle/configs/segmentation.yaml` (DiceCE loss, Ignite `SupervisedTrainer`,
`MeanDice` without background on the validation series; the final checkpoint, nothing selected on them).
Generated by `scripts/segmentation_study.py`.

- Scale: {scale}. Split: the dataset's own (training series train; validation and test series are evaluated).
- Reconstruction: `{args.ckpt}`, M = {args.M}, N = {args.N}, {args.steps} DDIM steps, simulate mode.
- Training budget: {args.epochs} epochs, seed {args.seed}, the config's defaults otherwise; seconds per step in
  `{out / 'segmentation_study.json'}`.

| variant | channels | mean Dice | {' | '.join(c[-8:] for c in cases)} |
|---|---|---|{'---|' * len(cases)}
{rows}

Per-case columns: the last 8 digits of each validation series uid; their nodule diameters:
{sizes}. With {len(cases)} validation series and one
training seed, differences between the rows are not evidence either way: this run shows that the four variants go
through the same workflow end to end; the question needs real LUNA16 (same commands, `--dataset`) and seeds.

## Commands

```
{chr(10).join(commands)}
```
""")
    print(json.dumps({k: round(v["dice"], 4) for k, v in results.items()}), "->", report)


if __name__ == "__main__":
    main()
