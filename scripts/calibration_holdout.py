"""How the calibration carries to a patient it never saw: leave one validation patient out at a time.

    python -m monai.bundle run calibrate \
        --config_file "['bundle/configs/common.yaml','bundle/configs/inference.yaml']" --data#dataset_dir study/ct_cal \
        --inference_cfg#calibration_fbp_pitches "['model','source']" --inference_cfg#M 4 --inference_cfg#N 4 \
        --diffusion#ddim_steps 10 --inference_cfg#calibration_samples study/ct_samples.pt
    python scripts/calibration_holdout.py study/ct_samples.pt --bins 3 6

For each number of noise bins and with and without EU bins (``--eu_bins``, the calibrate default), fit on the other
patients' cases and print, for each measurement (photon count and pitch, k-space noise and mask), the held-out
patients' 90% coverage and that of their 10% of pixels with the highest EU
(:func:`hyper_dm.calibration.holdout_coverage`). A case id is ``<patient>_<measurement>`` as the calibrate run names
it; MRI cases calibrated on several accelerations (ids ending ``_<a>x``) are held out within their acceleration, as
each acceleration has its own calibration.
"""

from __future__ import annotations

import argparse
import pickle
import re

import torch

from hyper_dm.calibration import holdout_coverage

_MEASUREMENT = re.compile(r"_(i0|kspace_noise)[0-9.e+-]+(_.*)?$")  # calibration_dataset's suffix


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="a calibrate run's inference_cfg#calibration_samples file")
    p.add_argument("--bins", type=int, nargs="+", default=[3], help="noise bins per acceleration (calibrate's: "
                   "len(calibration_noise_levels) x len(calibration_fbp_pitches))")
    p.add_argument("--eu_bins", type=float, nargs="*", default=[0.5, 0.9, 0.99])
    p.add_argument("--level", type=float, default=0.9)
    args = p.parse_args()
    try:
        samples = torch.load(args.samples, weights_only=True)
        ids = samples["case_ids"]
    except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as e:
        p.error(f"{args.samples}: not a calibrate run's samples file (inference_cfg#calibration_samples): "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
    for case_id in ids:
        if not _MEASUREMENT.search(case_id):
            p.error(f"{args.samples}: case id {case_id!r} is not <patient>_<i0|kspace_noise><level>[_...] as the "
                    "calibrate run names its cases")
    patients = [_MEASUREMENT.sub("", i) for i in ids]
    measurements = [i[len(p) + 1:] for i, p in zip(ids, patients, strict=True)]
    accelerations = [m.rsplit("_", 1)[-1] if re.search(r"_[0-9.]+x$", m) else "" for m in measurements]
    for bins in args.bins:
        for eu_bins in ([], args.eu_bins) if args.eu_bins else ([],):
            print(f"\n{bins} noise bins, {'EU bins at ' + str(eu_bins) if eu_bins else 'no EU bins'}: "
                  f"held-out {args.level:.0%} coverage per patient (its highest-EU tenth)")
            rows: dict[str, list[tuple[float, float]]] = {}
            for acceleration in dict.fromkeys(accelerations):
                cases = [i for i, a in enumerate(accelerations) if a == acceleration]
                pick = lambda key, cases=cases: [samples[key][i] for i in cases]  # noqa: E731
                covered = holdout_coverage(pick("residuals"), pick("noise_levels"), pick("eu"),
                                           [patients[i] for i in cases], bins, eu_bins, args.level)
                for i, c in zip(cases, covered, strict=True):
                    rows.setdefault(measurements[i], []).append(c)
            for measurement, values in rows.items():
                print(f"  {measurement:24s} " + "  ".join(f"{a:.3f} ({t:.3f})" for a, t in values))
            every = [c for values in rows.values() for c in values]
            print(f"  range {min(a for a, _ in every):.3f}-{max(a for a, _ in every):.3f} "
                  f"({min(t for _, t in every):.3f}-{max(t for _, t in every):.3f})")


if __name__ == "__main__":
    main()
