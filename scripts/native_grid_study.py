"""What the source grid gets from a model that works on a coarser one: PSNR tables for docs/recipes.md.

    python scripts/native_grid_study.py --task mri --ckpt study/knee_n3/knee_model.pt data.dataset_dir=study/knee_24 \
        model.noise_level_input=true
    python scripts/native_grid_study.py --task ct --ckpt bundle/models/model.pt \
        --calibration bundle/models/calibration.json data.dataset_dir=study/luna16_32

MRI (first test file, each k-space noise level of the report, 4x and 8x): the zero-filled input against the model's
mean upsampled bilinear and bicubic, then the product's mean (every draw upsampled bicubic and moved towards the
measured columns by the Wiener weight of :func:`hyper_dm.physics.mri.data_consistent`) and the bicubic mean with
its sampled columns replaced by the measurement (hard data consistency). CT (first test series, each photon count
of the report): the model fed the FBP simulated on its own grid (the benchmark's measurement) and the FBP simulated
at the series' own pixel pitch (what a scanner reconstructs, read as a measured FBP volume would be), each against
that FBP; the photon count is per detector bin of that pitch. With ``--calibration``, the CT table also says how
many slices the input check flags (:meth:`hyper_dm.calibration.Calibration.input_check`, as inference does) and
what share of the source-grid pixels the calibrated 90% intervals cover (the product's maps: the bicubic mean and
the bilinear total variance, the std scaled per noise bin and, with EU bins, per EU bin of the bilinear EU:
:meth:`~hyper_dm.calibration.Calibration.scale_map`).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from hyper_dm.calibration import Calibration, input_departure
from hyper_dm.config import BUNDLE_CONFIGS, parse_overrides
from hyper_dm.data.config import MEASUREMENT_NOISE
from hyper_dm.data.datasets import build_datalist
from hyper_dm.evaluation import MRI_ACCELERATIONS
from hyper_dm.inference import HyperDM, load_case
from hyper_dm.inference.reconstructor import resize_slices
from hyper_dm.uncertainty import gaussian_coverage, psnr


def db(estimate: torch.Tensor, reference: torch.Tensor, data_range: float) -> str:
    """PSNR of a whole volume (any layout, same for both) in dB, two decimals."""
    flat = lambda x: torch.as_tensor(x).float().flatten()[None, None, None]  # noqa: E731
    return f"{psnr(flat(estimate), flat(reference), data_range).item():.2f}"


def slices(volume: torch.Tensor) -> torch.Tensor:
    """``[1, X, Y, Z]`` -> ``[Z, 1, X, Y]``."""
    return volume[0].permute(2, 0, 1)[:, None].float()


def model_grid(model: HyperDM, recon, cond: torch.Tensor, case: dict) -> dict[str, torch.Tensor]:
    """The mean, total variance and EU on the model grid in model units (squared), ``[Z, 1, S, S]`` each."""
    size = int(model.data["img_size"])
    out = recon(cond, case["gain"], case["offset"], out_size=(size, size))
    gain = case["gain"].view(-1, 1, 1, 1)
    return {"mean": (slices(out["mean"]) - case["offset"].view(-1, 1, 1, 1)) / gain,
            "total": slices(out["total"]) / gain**2, "eu": slices(out["eu"]) / gain**2}


def upsampled(mean: torch.Tensor, case: dict, size: tuple[int, int], mode: str) -> torch.Tensor:
    """``mean [Z, 1, S, S]`` (model units) upsampled with ``mode`` and clamped to [-1, 1], in physical units."""
    image = F.interpolate(mean, size=size, mode=mode, align_corners=False).clamp(-1, 1)
    return image * case["gain"].view(-1, 1, 1, 1) + case["offset"].view(-1, 1, 1, 1)


def mri_table(model: HyperDM, recon, entry: dict) -> None:
    from hyper_dm.physics.mri import data_consistent

    print("| k-space noise | acceleration | zero-filled | bilinear | bicubic | draws + Wiener DC | "
          "bicubic + hard DC |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for level in MEASUREMENT_NOISE["mri"][1]:
        for name, acquisition in MRI_ACCELERATIONS.items():
            case = load_case(entry, {**model.data, **acquisition, "kspace_noise": level}, "simulate",
                             int(model.data["img_size"]))
            label, data_range = slices(case["label"])[:, 0], float(2 * case["gain"].mean())
            mean = model_grid(model, recon, case["cond"], case)["mean"]
            bilinear, bicubic = (upsampled(mean, case, label.shape[-2:], mode)[:, 0]
                                 for mode in ("bilinear", "bicubic"))
            wiener = slices(recon.reconstruct_case(case)["mean"])[:, 0]  # the product: every draw made consistent
            hard = data_consistent(bicubic.numpy(), case["kspace"], case["kspace_mask"], noise=0.0)
            print(f"| {level:g} | {name} | {db(slices(case['cond'])[:, 0], label, data_range)} | "
                  f"{db(bilinear, label, data_range)} | {db(bicubic, label, data_range)} | "
                  f"{db(wiener, label, data_range)} | {db(hard, label, data_range)} |", flush=True)


def calibrated(calibration: Calibration | None, recon, cond: torch.Tensor, grid: dict, case: dict,
               label: torch.Tensor) -> str:
    """The calibration columns from the model-grid ``grid`` (:func:`model_grid`) of ``cond``: ``k / Z`` slices the
    input check flags, and the coverage of the calibrated 90% intervals on the grid of ``label [Z, 1, X, Y]``."""
    if calibration is None:
        return ""
    gain = case["gain"].view(-1, 1, 1, 1)
    mean = (grid["mean"] * gain + case["offset"].view(-1, 1, 1, 1))[:, 0].permute(1, 2, 0)[None]
    noise = recon.noise_levels(cond, case["gain"], case["offset"])
    check = calibration.input_check(input_departure(cond, mean, case["gain"]), noise)
    size = tuple(label.shape[-2:])
    as_volume = lambda x: resize_slices(x, size)[:, 0].permute(1, 2, 0)[None]  # noqa: E731  [1, X, Y, Z], model units
    scale = slices(calibration.scale_map(noise, as_volume(grid["eu"]), intensity=as_volume(grid["mean"])))
    variance = resize_slices(grid["total"], size) * (gain * scale) ** 2
    covered = gaussian_coverage(upsampled(grid["mean"], case, size, "bicubic"), variance, label, [0.9])[0.9]
    return f" {check['slices_unlike_calibration']} / {mean.shape[-1]} | {covered:.3f} |"


def ct_table(model: HyperDM, recon, entry: dict, calibration: Calibration | None, every: int = 1) -> None:
    """The CT table on every ``every``-th slice of the series."""
    check = (" input check: slices flagged | calibrated 90% coverage |", " --- | --- |") \
        if calibration is not None else ("", "")
    print(f"| FBP simulated at | i0 per detector bin | FBP | mean, bilinear | mean, bicubic |{check[0]}")
    print(f"| --- | --- | --- | --- | --- |{check[1]}")
    for i0 in MEASUREMENT_NOISE["ct"][1]:
        data = {**model.data, "i0": i0, "noise": "poisson"}
        grid = int(model.data["img_size"])
        case = load_case(entry, data, "simulate", grid)
        at_source_pitch = load_case(entry, {**data, "fbp_pitch": "source"}, "simulate", grid)["cond"][..., ::every]
        case = {**case, **{k: case[k][..., ::every] for k in ("cond", "label", "gain", "offset")}}
        label = slices(case["label"])
        size = tuple(label.shape[-2:])
        for where, cond in (("the model grid", case["cond"]), ("the source's pitch", at_source_pitch)):
            fbp = F.interpolate(slices(cond), size=size, mode="bilinear", align_corners=False)
            grid = model_grid(model, recon, cond, case)
            print(f"| {where} | {i0:.0e} | {db(fbp, label, 2000.0)} | "
                  f"{db(upsampled(grid['mean'], case, size, 'bilinear'), label, 2000.0)} | "
                  f"{db(upsampled(grid['mean'], case, size, 'bicubic'), label, 2000.0)} |"
                  f"{calibrated(calibration, recon, cond, grid, case, label)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("ct", "mri"), required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--M", type=int, default=4)
    parser.add_argument("--N", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--calibration", help="a calibration JSON with input departures (CT: the input check column)")
    parser.add_argument("--every", type=int, default=1, help="CT: every k-th slice of the series")
    parser.add_argument("overrides", nargs="*", help="key.subkey=value, e.g. data.dataset_dir=study/knee_24")
    args = parser.parse_args(argv)
    config = str(BUNDLE_CONFIGS / "knee_singlecoil.yaml") if args.task == "mri" else None
    model = HyperDM.from_bundle(args.ckpt, config=config, **parse_overrides(args.overrides))
    entry = build_datalist(model.data)["test"][0]
    entry = {"image": entry["image"], "case_id": entry["case_id"]}
    recon = model.reconstructor(args.M, args.N, args.steps)
    if args.task == "mri":
        mri_table(model, recon, entry)
    else:
        ct_table(model, recon, entry, Calibration.load(args.calibration) if args.calibration else None, args.every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
