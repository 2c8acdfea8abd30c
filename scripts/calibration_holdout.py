"""How the calibration carries to a patient it never saw: leave one validation patient out at a time.

    python -m monai.bundle run calibrate \
        --config_file "['bundle/configs/common.yaml','bundle/configs/inference.yaml']" --data#dataset_dir study/ct_cal \
        --inference_cfg#calibration_fbp_pitches "['model','source']" --inference_cfg#M 4 --inference_cfg#N 4 \
        --diffusion#ddim_steps 10 --inference_cfg#calibration_samples study/ct_samples.pt
    python scripts/calibration_holdout.py study/ct_samples.pt --bins 3 6

For each number of noise bins, with and without EU bins (``--eu_bins``, the calibrate default) and, where the samples
hold the cases' means (from metadata 0.15.0), with and without intensity classes (``--intensity_edges``, model
units, the calibrate default: air against tissue) and, with ``--eu_level both`` or ``on``, with scales that follow
each slice's EU level (the calibrate default), fit on the other patients' cases and print, for each measurement
(photon count and pitch, k-space noise and mask), the held-out patients' 90% coverage, that of their 10% of pixels
with the highest EU and that of their tissue (mean above ``hyper_dm.calibration.TISSUE_FLOOR``)
(:func:`hyper_dm.inference.calibration_holdout`; the calibrate run logs the same for its own settings). MRI cases
calibrated on several accelerations are held out within their acceleration, as each has its own calibration.
"""

from __future__ import annotations

import argparse
import itertools
import pickle

import torch

from hyper_dm.calibration import TISSUE_FLOOR
from hyper_dm.inference import calibration_holdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="a calibrate run's inference_cfg#calibration_samples file")
    p.add_argument("--bins", type=int, nargs="+", default=[3], help="noise bins per acceleration (calibrate's: "
                   "len(calibration_noise_levels) x len(calibration_fbp_pitches))")
    p.add_argument("--eu_bins", type=float, nargs="*", default=[0.5, 0.9, 0.99])
    p.add_argument("--intensity_edges", type=float, nargs="*", default=[TISSUE_FLOOR])
    p.add_argument("--eu_level", choices=["both", "on", "off"], default="both",
                   help="scales that follow the slices' EU level: with and without, only with, only without")
    p.add_argument("--level", type=float, default=0.9)
    args = p.parse_args()
    try:
        samples = torch.load(args.samples, weights_only=True)
        cases = [samples[key] for key in ("case_ids", "residuals", "noise_levels", "eu")]
    except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as e:
        p.error(f"{args.samples}: not a calibrate run's samples file (inference_cfg#calibration_samples): "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
    means = samples.get("means") or []
    variants = lambda levels: ([], levels) if levels else ([],)  # noqa: E731
    eu_levels = {"both": (False, True), "on": (True,), "off": (False,)}[args.eu_level]
    for bins, eu_bins, classes, eu_level in itertools.product(args.bins, variants(args.eu_bins),
                                                              variants(args.intensity_edges if means else []),
                                                              eu_levels):
        try:
            rows = calibration_holdout(*cases, bins, eu_bins, args.level, means, classes, eu_level)
        except ValueError as e:
            p.error(f"{args.samples}: {e}")
        if not rows:
            p.error(f"{args.samples}: fewer than two validation patients to hold out")
        print(f"\n{bins} noise bins, {'intensity classes cut at ' + str(classes) + ', ' if classes else ''}"
              f"{'EU bins at ' + str(eu_bins) if eu_bins else 'no EU bins'}"
              f"{', scales following the EU level' if eu_level else ''}: held-out {args.level:.0%} "
              f"coverage per patient (its highest-EU tenth{', its tissue' if means else ''})")
        shown = 3 if means else 2
        for measurement, values in rows.items():
            print(f"  {measurement:24s} " + "  ".join(
                f"{c[0]:.3f} ({', '.join(f'{x:.3f}' for x in c[1:shown])})" for c in values))
        every = [c for values in rows.values() for c in values]
        print("  range " + ", ".join(f"{min(c[k] for c in every):.3f}-{max(c[k] for c in every):.3f}"
                                     for k in range(shown)))

if __name__ == "__main__":
    main()
