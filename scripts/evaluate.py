"""Evaluate a trained model the way the Hyper-DM paper does and write ``report.md`` with its plots.

    python scripts/evaluate.py --ckpt bundle/models/model.pt --out docs/           # synthetic test split
    python scripts/evaluate.py --ckpt model.pt --config bundle/configs/ct_luna16.yaml data.dataset_dir=/data/LUNA16
    python scripts/evaluate.py --ckpt knee.pt --config bundle/configs/knee_singlecoil.yaml --out docs/mri/

For every test case (the ``test`` split of ``data#dataset_dir``, measurements simulated as in the benchmark mode;
MRI at 4x and 8x acceleration):

- quality: PSNR / SSIM (and NMSE, fastMRI's definition) of the mean and of the input (FBP / zero-filled) against
  the reference;
- distribution: Gaussian CRPS, coverage of the central 50/90/95% intervals raw and with the split-conformal
  calibration (``--calibration``, fitted by the bundle's ``calibrate`` run id), UCE, AUSE against a random ordering,
  sparsification and reliability plots;
- epistemic: the same case with an object the training set never had, written as a file and read back like any
  user's (CT: a dense 30 mm disc with a stripe texture in the right lung, NIfTI; MRI: a bright striped 12 mm
  lesion, fastMRI ``.h5``): EU inside it against EU in the rest of the body, per slice;
- aleatoric: the case at three measurement noise levels (CT: photon count ``i0``; MRI: ``kspace_noise``): mean AU
  and EU at each.

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
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hyper_dm.calibration import Calibration
from hyper_dm.config import parse_overrides
from hyper_dm.data import build_datalist
from hyper_dm.data.synthetic import insert_bright_lesion, insert_dense_disc
from hyper_dm.inference import HyperDM, case_metrics, load_calibration, load_case
from hyper_dm.uncertainty import ause, psnr, sparsification_curves, ssim

PHOTON_COUNTS = (1e5, 1e4, 1e3)
KSPACE_NOISE = (0.0, 0.03, 0.1)
MRI_ACCELERATIONS = {"4x": {"accelerations": [4], "center_fractions": [0.08]},
                     "8x": {"accelerations": [8], "center_fractions": [0.04]}}  # fastMRI's pairs
LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def input_quality(case: dict, data_range: float) -> dict:
    """PSNR / SSIM / NMSE of the input (FBP / zero-filled, resized to the reference grid) against the reference."""
    label = case["label"].float()
    cond = F.interpolate(case["cond"][0].permute(2, 0, 1)[:, None], size=tuple(label.shape[1:3]), mode="bilinear")
    label_slices = label[0].permute(2, 0, 1)[:, None]
    return {"psnr_db": psnr(cond.flatten()[None, None, None], label_slices.flatten()[None, None, None],
                            data_range).item(),
            "ssim": ssim(cond, label_slices, data_range).mean().item(), "nmse": nmse(cond, label_slices)}


def nmse(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """fastMRI's normalised MSE of a volume: ``||target - prediction||^2 / ||target||^2``."""
    return float((target - prediction).double().pow(2).sum() / target.double().pow(2).sum())


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
    parser.add_argument("--cases", type=int, default=None, help="evaluate the first K test cases (default: all)")
    parser.add_argument("overrides", nargs="*", help="key.subkey=value, e.g. data.dataset_dir=/data/LUNA16")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = HyperDM.from_bundle(args.ckpt, config=args.config, **parse_overrides(args.overrides))
    ct = model.data["task"] == "ct"
    calibration = load_calibration(args.calibration, args.ckpt)
    settings = {"": {}} if ct else MRI_ACCELERATIONS  # name -> data overrides (the measurement)
    noise_key, noise_levels = ("i0", PHOTON_COUNTS) if ct else ("kspace_noise", KSPACE_NOISE)
    size = int(model.data["img_size"])
    recon = model.reconstructor(args.M, args.N, args.steps)
    run = lambda case: recon(case["cond"], case["gain"], case["offset"],  # noqa: E731
                             out_size=tuple(case["volume"].shape[1:3]))
    rows, reliab, sparsity, ood, noise, timings = [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for entry in build_datalist(model.data)["test"][:args.cases]:
            entry = {"image": entry["image"], "case_id": entry["case_id"]}
            for setting, overrides in settings.items():
                data = {**model.data, **overrides}
                start = time.perf_counter()
                case = load_case(entry, data, "simulate", size)
                raw = run(case)
                timings.append((time.perf_counter() - start) / case["volume"].shape[-1])
                label = case["label"].float()
                data_range = 2000.0 if ct else float(2 * case["gain"].mean())
                metrics = case_metrics(raw, label, data_range, calibration)
                error = (raw["mean"] - label).abs().flatten()
                total = raw["total"].flatten()
                stride = max(1, error.numel() // (1 << 20))
                random_ause = ause(torch.rand(error[::stride].shape, generator=torch.Generator().manual_seed(0)),
                                   error[::stride])
                slices = lambda x: x[0].permute(2, 0, 1)[:, None]  # noqa: E731
                rows.append({"case_id": entry["case_id"], "setting": setting, "input": input_quality(case, data_range),
                             **metrics, "nmse": nmse(slices(raw["mean"]), slices(label)), "ause_random": random_ause})
                reliab.append(reliability(raw, label, calibration))
                sparsity.append([c.tolist() for c in sparsification_curves(total[::stride], error[::stride])])

                # epistemic: an unfamiliar object, as a user's file
                object_file = Path(tmp) / ("object.nii.gz" if ct else "object.h5")
                mask = (insert_dense_disc if ct else insert_bright_lesion)(entry["image"], object_file)
                ood_case = load_case({"image": str(object_file), "case_id": "object"}, data, "simulate", size)
                ood_raw = run(ood_case)
                # the mask lives in the loaded volume's (x, y, z) order (CT: LPS like LUNA16; MRI: the 320 grid)
                eu = ood_raw["eu"][0].numpy()
                reference = ood_case["label"][0].numpy()
                body = reference > -990 if ct else reference > 0.1 * reference.max()  # tissue, not air
                ratios = [float(eu[..., k][mask[..., k]].mean() / max(eu[..., k][body[..., k] & ~mask[..., k]].mean(),
                                                                        1e-30)) for k in range(eu.shape[-1])]
                mid = eu.shape[-1] // 2
                ood.append({"case_id": entry["case_id"], "setting": setting, "median_ratio": float(np.median(ratios)),
                            "eu_inside": float(eu[mask].mean()), "eu_body": float(eu[body & ~mask].mean()),
                            "maps": {"input": F.interpolate(ood_case["cond"][0, ..., mid][None, None],
                                                            size=eu.shape[:2], mode="bilinear")[0, 0].numpy(),
                                     "mean": ood_raw["mean"][0, ..., mid].numpy(), "eu": eu[..., mid],
                                     "au": ood_raw["au"][0, ..., mid].numpy()}})

                # aleatoric: the same case at three measurement noise levels
                for level in noise_levels:
                    noisy = load_case(entry, {**data, noise_key: level, **({"noise": "poisson"} if ct else {})},
                                      "simulate", size)
                    res = run(noisy)
                    noise.append({"case_id": entry["case_id"], "setting": setting, "level": level,
                                  "mean_au": float(res["au"].mean()), "mean_eu": float(res["eu"].mean()),
                                  "rmse": float((res["mean"] - noisy["label"]).pow(2).mean().sqrt())})

    write_report(out, args, model, rows, reliab, sparsity, ood, noise, timings, calibration)
    print(f"wrote {out / 'report.md'}")
    return 0


def write_report(out, args, model, rows, reliab, sparsity, ood, noise, timings, calibration) -> None:
    """``report.md`` / ``report.json`` and their PNG plots in ``out`` (one section per measurement setting)."""
    ct = model.data["task"] == "ct"
    unit, var_unit = ("HU", "HU^2") if ct else ("a.u.", "a.u.^2")  # MRI: fastMRI magnitude units
    noise_name = "i0 (photons / bin)" if ct else "k-space noise std / magnitude scale"
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    levels = np.array(LEVELS)
    avg = lambda items, key: float(np.mean([i[key] for i in items]))  # noqa: E731
    noise_rows = [{"setting": s, "level": lv, **{k: avg([n for n in noise if n["setting"] == s and n["level"] == lv], k)
                                                  for k in ("mean_au", "mean_eu", "rmse")}}
                  for s in settings for lv in dict.fromkeys(n["level"] for n in noise)]
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
        ("AU and EU vs measurement noise", lambda ax: (
            *[ax.plot([n["level"] for n in noise_rows if n["setting"] == s],
                      [n[key] for n in noise_rows if n["setting"] == s], marker, label=f"mean {name} {s}".strip())
              for s in settings for key, name, marker in (("mean_au", "AU", "o-"), ("mean_eu", "EU", "s-"))],
            ax.set_xscale("log" if ct else "linear"), ax.set_xlabel(noise_name), ax.set_ylabel(var_unit),
            ax.legend())),
    ])

    def show(image: np.ndarray, cmap: str) -> callable:
        return lambda ax: (ax.imshow(np.asarray(image).T, origin="lower", cmap=cmap), ax.set_axis_off())

    maps = ood[0]["maps"]
    plot(out / "ood_object.png", [(name, show(maps[name], "gray" if name in ("input", "mean") else "magma"))
                                  for name in ("input", "mean", "eu", "au")])
    fmt = (lambda v: f"{v:.1f}") if ct else (lambda v: f"{v:.3g}")  # noqa: E731
    input_name = "FBP" if ct else "zero-filled"
    physics = (f"{model.data['n_views']} views, i0 {model.data['i0']:.0e}" if ct else
               f"{model.data['mask_type']} masks, " + ", ".join(f"{k} (center {v['center_fractions'][0]})"
                                                               for k, v in MRI_ACCELERATIONS.items()))
    text = [f"# Hyper-DM evaluation: {'sparse-view CT' if ct else 'accelerated single-coil knee MRI'}", "",
            args.label, "",
            f"Command: `python scripts/evaluate.py --ckpt {args.ckpt}"
            + (f" --config {args.config}" if args.config else "") + (f" --calibration {args.calibration}"
                                                                      if args.calibration else "")
            + f" --M {args.M} --N {args.N}" + (f" --steps {args.steps}" if args.steps else "")
            + (f" --cases {args.cases}" if args.cases else "") + "".join(f" {o}" for o in args.overrides) + "` (steps "
            f"{args.steps or 'ddim_steps'}; {len({r['case_id'] for r in rows})} test case(s), model grid "
            f"{model.data['img_size']} px, {physics}); {np.mean(timings):.2f} s per slice here.", ""]
    for s in settings:
        sel = [r for r in rows if r["setting"] == s]
        o = [x for x in ood if x["setting"] == s]
        nr = [n for n in noise_rows if n["setting"] == s]
        au, eu = [n["mean_au"] for n in nr], [n["mean_eu"] for n in nr]
        m = lambda key, sel=sel: avg(sel, key)  # noqa: E731
        i = lambda key, sel=sel: avg([r["input"] for r in sel], key)  # noqa: E731
        cal = ("| calibrated | " + " | ".join(f"{m(f'coverage_{q}_calibrated'):.3f}" for q in (50, 90, 95)) + " |"
               if calibration else "| calibrated | (no calibration file given) | | |")
        text += [f"## {s + ' acceleration: ' if s else ''}quality (mean of the test cases)", "",
                 "| | PSNR (dB) | SSIM | NMSE |", "| --- | --- | --- | --- |",
                 f"| {input_name} (input) | {i('psnr_db'):.2f} | {i('ssim'):.3f} | {i('nmse'):.4f} |",
                 f"| Hyper-DM mean | {m('psnr_db'):.2f} | {m('ssim'):.3f} | {m('nmse'):.4f} |", "",
                 f"Gain over {input_name}: {m('psnr_db') - i('psnr_db'):+.2f} dB.", "",
                 f"## {s + ' acceleration: ' if s else ''}distribution", "",
                 "| intervals | 50% | 90% | 95% |", "| --- | --- | --- | --- |",
                 f"| raw | {m('coverage_50'):.3f} | {m('coverage_90'):.3f} | {m('coverage_95'):.3f} |", cal, "",
                 f"CRPS {fmt(m('crps'))} {unit}; UCE {fmt(m('uce'))} {var_unit}; AUSE {m('ause'):.3f} (random "
                 f"ordering {m('ause_random'):.3f}); mean EU {fmt(m('mean_eu'))} {var_unit}, mean AU "
                 f"{fmt(m('mean_au'))} {var_unit}, RMSE {fmt(m('rmse'))} {unit} (squared {fmt(m('rmse') ** 2)} "
                 f"{var_unit} against a predicted total variance of {fmt(m('mean_total'))} {var_unit}).", "",
                 f"## {s + ' acceleration: ' if s else ''}epistemic: an object the training set never had", "",
                 ("A dense striped 30 mm disc inserted in the right lung of each test case (written as a NIfTI study "
                  "and read back through the user path)." if ct else
                  "A bright striped 12 mm lesion added to the image behind each test file's k-space (written as a "
                  "fastMRI .h5 and read back through the user path).")
                 + " Median over slices of mean EU inside it / mean EU in the rest of the body: "
                 + ", ".join(f"{x['median_ratio']:.2f}" for x in o) + " (target >= 3).", "",
                 f"## {s + ' acceleration: ' if s else ''}aleatoric: measurement noise", "",
                 f"| {noise_name} | mean AU ({var_unit}) | mean EU ({var_unit}) | RMSE ({unit}) |",
                 "| --- | --- | --- | --- |",
                 *[f"| {n['level']:.3g} | {fmt(n['mean_au'])} | {fmt(n['mean_eu'])} | {fmt(n['rmse'])} |" for n in nr],
                 "", f"AU rises strictly with the noise: {all(a < b for a, b in zip(au, au[1:], strict=False))}; "
                 f"relative change of AU {(au[-1] - au[0]) / max(au[0], 1e-30):+.2f}, of EU "
                 f"{(eu[-1] - eu[0]) / max(eu[0], 1e-30):+.2f}.", ""]
    text += ["![calibration](calibration.png)", "", "![object](ood_object.png)", ""]
    (out / "report.md").write_text("\n".join(text))
    (out / "report.json").write_text(json.dumps({"rows": rows, "ood": [{k: v for k, v in o.items() if k != "maps"}
                                                                       for o in ood], "noise": noise_rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
