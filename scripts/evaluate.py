"""Evaluate a trained CT model the way the Hyper-DM paper does and write ``report.md`` with its plots.

    python scripts/evaluate.py --ckpt bundle/models/model.pt --out docs/           # synthetic test split
    python scripts/evaluate.py --ckpt model.pt --config bundle/configs/ct_luna16.yaml data.dataset_dir=/data/LUNA16

For every test case (the ``test`` split of ``data#dataset_dir``, measurements simulated as in the benchmark mode):

- quality: PSNR / SSIM of the mean and of the FBP input against the reference;
- distribution: Gaussian CRPS, coverage of the central 50/90/95% intervals raw and with the split-conformal
  calibration (``--calibration``, fitted by the bundle's ``calibrate`` run id), UCE, AUSE against a random ordering,
  sparsification and reliability plots;
- epistemic: the same case with an object the training set never had (a dense 30 mm disc with a stripe texture
  in the right lung, written as a NIfTI study and read back like any user's file): EU inside it against EU in
  the rest of the body, per slice;
- aleatoric: the case at three photon counts (``i0``): mean AU and EU at each.

Everything is computed through the product's own path (``HyperDM.reconstruct``), so the same command evaluates
any checkpoint and any dataset the bundle reads.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hyper_dm.calibration import Calibration
from hyper_dm.config import parse_overrides
from hyper_dm.data import build_datalist
from hyper_dm.inference import HyperDM, case_metrics, load_calibration, load_case
from hyper_dm.uncertainty import ause, psnr, sparsification_curves, ssim

PHOTON_COUNTS = (1e5, 1e4, 1e3)
LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def insert_object(mhd: Path, out: Path, radius_mm: float = 15.0, hu: float = 900.0) -> np.ndarray:
    """Write ``mhd`` with a striped dense disc (axial, every slice) in the right lung as NIfTI; return the disc mask
    ``[X, Y, Z]`` in the file's index order (x, y, z)."""
    image = sitk.ReadImage(str(mhd))
    volume = sitk.GetArrayFromImage(image).astype(np.float32)  # [z, y, x]
    spacing = np.array(image.GetSpacing())
    nz, ny, nx = volume.shape
    y, x = np.meshgrid(np.arange(ny) * spacing[1], np.arange(nx) * spacing[0], indexing="ij")
    cx, cy = 0.32 * nx * spacing[0], 0.45 * ny * spacing[1]  # patient right lung (LUNA16 LPS index order)
    disc = (x - cx) ** 2 + (y - cy) ** 2 <= radius_mm**2
    stripes = (np.floor((x - cx) / 3.0) % 2).astype(np.float32)
    for k in range(nz):
        volume[k][disc] = hu - 600.0 * stripes[disc]
    out_image = sitk.GetImageFromArray(volume)
    out_image.CopyInformation(image)
    sitk.WriteImage(out_image, str(out))
    return np.repeat(disc.T[:, :, None], nz, axis=2)


def fbp_quality(case: dict) -> dict:
    """PSNR / SSIM of the FBP input (resized to the reference grid) against the reference, HU window range."""
    label = case["label"].float()
    cond = F.interpolate(case["cond"][0].permute(2, 0, 1)[:, None], size=tuple(label.shape[1:3]), mode="bilinear")
    label_slices = label[0].permute(2, 0, 1)[:, None]
    return {"psnr_db": psnr(cond.flatten()[None, None, None], label_slices.flatten()[None, None, None], 2000.0).item(),
            "ssim": ssim(cond, label_slices, 2000.0).mean().item()}


def reliability(out: dict, label: torch.Tensor, calibration: Calibration | None) -> dict[str, list[float]]:
    """Observed coverage of central Gaussian intervals at :data:`LEVELS`, raw and calibrated."""
    error = (label - out["mean"]).abs().double().flatten()
    sigma = out["total"].double().clamp_min(0).sqrt().flatten()
    z = [float(np.sqrt(2) * torch.erfinv(torch.tensor(level, dtype=torch.float64))) for level in LEVELS]
    curves = {"raw": [float((error <= zi * sigma).double().mean()) for zi in z]}
    if calibration is not None:
        curves["calibrated"] = [float((error <= zi * calibration.scale * sigma).double().mean()) for zi in z]
    return curves


def plot(path: Path, panels: list[tuple[str, callable]]) -> None:
    fig = Figure(figsize=(4.2 * len(panels), 3.6))
    FigureCanvasAgg(fig)
    for ax, (title, draw) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        draw(ax)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--config", help="a task overlay (e.g. bundle/configs/ct_luna16.yaml)")
    parser.add_argument("--calibration", help="calibration.json fitted by the 'calibrate' run id")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--M", type=int, default=4)
    parser.add_argument("--N", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: diffusion.ddim_steps)")
    parser.add_argument("--label", default="", help="a line describing the model and its training budget")
    parser.add_argument("overrides", nargs="*", help="key.subkey=value, e.g. data.dataset_dir=/data/LUNA16")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = HyperDM.from_bundle(args.ckpt, config=args.config, **parse_overrides(args.overrides))
    if model.data["task"] != "ct":
        raise SystemExit("evaluate.py: this version evaluates the CT task only")
    calibration = load_calibration(args.calibration, args.ckpt)
    cases = build_datalist(model.data)["test"]
    rows, reliab, sparsity, ood, noise = [], [], [], [], []
    timings = []
    with tempfile.TemporaryDirectory() as tmp:
        for entry in cases:
            entry = {"image": entry["image"], "case_id": entry["case_id"]}
            start = time.perf_counter()
            case = load_case(entry, model.data, "simulate", int(model.data["img_size"]))
            recon = model.reconstructor(args.M, args.N, args.steps)
            raw = recon(case["cond"], case["gain"], case["offset"], out_size=tuple(case["volume"].shape[1:3]))
            timings.append((time.perf_counter() - start) / case["volume"].shape[-1])
            label = case["label"].float()
            metrics = case_metrics(raw, label, 2000.0, calibration)
            error = (raw["mean"] - label).abs().flatten()
            total = raw["total"].flatten()
            stride = max(1, error.numel() // (1 << 20))
            random_ause = ause(torch.rand(error[::stride].shape, generator=torch.Generator().manual_seed(0)),
                               error[::stride])
            rows.append({"case_id": entry["case_id"], "fbp": fbp_quality(case), **metrics, "ause_random": random_ause})
            reliab.append(reliability(raw, label, calibration))
            sparsity.append([c.tolist() for c in sparsification_curves(total[::stride], error[::stride])])

            # epistemic: an unfamiliar object, as a user's NIfTI study
            mask = insert_object(Path(entry["image"]), Path(tmp) / "object.nii.gz")
            ood_case = load_case({"image": str(Path(tmp) / "object.nii.gz"), "case_id": "object"}, model.data,
                                 "simulate", int(model.data["img_size"]))
            ood_raw = recon(ood_case["cond"], ood_case["gain"], ood_case["offset"],
                            out_size=tuple(ood_case["volume"].shape[1:3]))
            # back to the file's (x, y, z) index order, where the mask lives: the oriented grid is LPS like LUNA16
            eu = ood_raw["eu"][0].numpy()
            body = ood_case["label"][0].numpy() > -990  # inside the patient (lungs included), not air
            ratios = [float(eu[..., k][mask[..., k]].mean() / max(eu[..., k][body[..., k] & ~mask[..., k]].mean(),
                                                                    1e-12)) for k in range(eu.shape[-1])]
            ood.append({"case_id": entry["case_id"], "median_ratio": float(np.median(ratios)),
                        "eu_inside": float(eu[mask].mean()), "eu_body": float(eu[body & ~mask].mean()),
                        "maps": {"cond": ood_case["cond"][0, ..., eu.shape[-1] // 2].numpy(),
                                 "mean": ood_raw["mean"][0, ..., eu.shape[-1] // 2].numpy(),
                                 "eu": eu[..., eu.shape[-1] // 2], "au": ood_raw["au"][0, ..., eu.shape[-1] // 2]}})

            # aleatoric: the same case at three photon counts
            for i0 in PHOTON_COUNTS:
                noisy = load_case(entry, {**model.data, "noise": "poisson", "i0": i0}, "simulate",
                                  int(model.data["img_size"]))
                res = recon(noisy["cond"], noisy["gain"], noisy["offset"], out_size=tuple(noisy["volume"].shape[1:3]))
                noise.append({"case_id": entry["case_id"], "i0": i0, "mean_au": float(res["au"].mean()),
                              "mean_eu": float(res["eu"].mean()),
                              "rmse": float((res["mean"] - noisy["label"]).pow(2).mean().sqrt())})

    write_report(out, args, model, rows, reliab, sparsity, ood, noise, timings, calibration)
    print(f"wrote {out / 'report.md'}")
    return 0


def write_report(out, args, model, rows, reliab, sparsity, ood, noise, timings, calibration) -> None:
    """``report.md`` and its PNG plots in ``out``."""
    mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    fbp = lambda key: float(np.mean([r["fbp"][key] for r in rows]))  # noqa: E731
    levels = np.array(LEVELS)
    noise = [{"i0": i0, **{k: float(np.mean([n[k] for n in noise if n["i0"] == i0])) for k in ("mean_au", "mean_eu",
                                                                                              "rmse")}}
             for i0 in PHOTON_COUNTS]  # mean over the test cases per photon count
    plot(out / "calibration.png", [
        ("reliability (central intervals)", lambda ax: (
            ax.plot(levels, levels, "k--", label="ideal"),
            ax.plot(levels, np.mean([r["raw"] for r in reliab], axis=0), "o-", label="raw"),
            *([ax.plot(levels, np.mean([r["calibrated"] for r in reliab], axis=0), "s-", label="calibrated")]
              if calibration else []),
            ax.set_xlabel("nominal"), ax.set_ylabel("observed"), ax.legend())),
        ("sparsification (|error|)", lambda ax: (
            ax.plot(sparsity[0][0], np.mean([s[1] for s in sparsity], axis=0), label="by total std"),
            ax.plot(sparsity[0][0], np.mean([s[2] for s in sparsity], axis=0), label="oracle"),
            ax.axhline(1.0, color="k", ls="--", label="random"),
            ax.set_xlabel("fraction removed"), ax.set_ylabel("relative mean error"), ax.legend())),
        ("AU and EU vs photon count", lambda ax: (
            ax.plot([n["i0"] for n in noise], [n["mean_au"] for n in noise], "o-", label="mean AU"),
            ax.plot([n["i0"] for n in noise], [n["mean_eu"] for n in noise], "s-", label="mean EU"),
            ax.set_xscale("log"), ax.set_xlabel("i0 (photons / bin)"), ax.set_ylabel("HU^2"), ax.legend())),
    ])
    maps = ood[0]["maps"]
    def show(image: np.ndarray, cmap: str) -> callable:
        return lambda ax: (ax.imshow(np.asarray(image).T, origin="lower", cmap=cmap), ax.set_axis_off())

    plot(out / "ood_object.png", [(name, show(maps[name], "gray" if name in ("cond", "mean") else "magma"))
                                  for name in ("cond", "mean", "eu", "au")])
    cal = ("| calibrated | " + " | ".join(f"{mean(f'coverage_{p}_calibrated'):.3f}" for p in (50, 90, 95)) + " |"
           if calibration else "| calibrated | (no calibration file given) | | |")
    au = [n["mean_au"] for n in noise]
    eu = [n["mean_eu"] for n in noise]
    text = f"""# Hyper-DM evaluation: sparse-view CT

{args.label}

Command: `python scripts/evaluate.py --ckpt {args.ckpt} --M {args.M} --N {args.N}` \
(steps {args.steps or 'ddim_steps'}; {len(rows)} test case(s), model grid {model.data['img_size']} px, \
{model.data['n_views']} views, i0 {model.data['i0']:.0e}); {np.mean(timings):.2f} s per slice here.

## Quality (mean of the test cases, HU window [-1000, 1000])

| | PSNR (dB) | SSIM |
| --- | --- | --- |
| FBP (input) | {fbp('psnr_db'):.2f} | {fbp('ssim'):.3f} |
| Hyper-DM mean | {mean('psnr_db'):.2f} | {mean('ssim'):.3f} |

Gain over FBP: {mean('psnr_db') - fbp('psnr_db'):+.2f} dB.

## Distribution

| intervals | 50% | 90% | 95% |
| --- | --- | --- | --- |
| raw | {mean('coverage_50'):.3f} | {mean('coverage_90'):.3f} | {mean('coverage_95'):.3f} |
{cal}

CRPS {mean('crps'):.1f} HU; UCE {mean('uce'):.0f} HU^2; AUSE {mean('ause'):.3f} (random ordering
{mean('ause_random'):.3f}); mean EU {mean('mean_eu'):.1f} HU^2, mean AU {mean('mean_au'):.2f} HU^2, RMSE
{mean('rmse'):.1f} HU (squared {mean('rmse') ** 2:.0f} HU^2 against a predicted total variance of
{mean('mean_total'):.1f} HU^2).

![calibration](calibration.png)

## Epistemic: an object the training set never had

A dense striped 30 mm disc inserted in the right lung of each test case (written as a NIfTI study and read back
through the user path). Median over slices of mean EU inside the disc / mean EU in the rest of the body:
{', '.join(f"{o['median_ratio']:.2f}" for o in ood)} (target >= 3).

![object](ood_object.png)

## Aleatoric: photon count

| i0 | mean AU (HU^2) | mean EU (HU^2) | RMSE (HU) |
| --- | --- | --- | --- |
""" + "".join(f"| {n['i0']:.0e} | {n['mean_au']:.2f} | {n['mean_eu']:.1f} | {n['rmse']:.1f} |\n"
             for n in noise) + f"""
AU rises strictly with the noise: {all(a < b for a, b in zip(au, au[1:], strict=False))}; relative change of AU
{(au[-1] - au[0]) / max(au[0], 1e-12):+.2f}, of EU {(eu[-1] - eu[0]) / max(eu[0], 1e-12):+.2f}.
"""
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps({"rows": rows, "ood": [{k: v for k, v in o.items() if k != "maps"}
                                                                       for o in ood], "noise": noise}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
