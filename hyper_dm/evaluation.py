"""The evaluation of docs/report.md for any checkpoint and dataset the bundle reads (the paper's measurements).

For every test case (the ``test`` split of ``data#dataset_dir``, measurements simulated as in the benchmark mode;
MRI at 4x and 8x acceleration):

- quality: PSNR / SSIM (and NMSE, fastMRI's definition) of the mean and of the input (FBP / zero-filled) against
  the reference;
- distribution: Gaussian CRPS, coverage of the central 50/90/95% intervals raw and with the split-conformal
  calibration (fitted by the bundle's ``calibrate`` run id), UCE, AUSE against a random ordering, sparsification
  and reliability plots;
- epistemic: the same case with an object the training set never had, written as a file and read back like any
  user's (:data:`OBJECTS`; CT: a dense 30 mm disc with a stripe texture in the right lung, and a 30 mm checkered
  square there, NIfTI; MRI: a bright striped 12 mm lesion, and a 12 mm square of checkers, fastMRI ``.h5``): EU,
  squared error and predicted variance inside it against the rest of the body, per slice, and the coverage of its
  pixels; EU from the mean EU map of ``repeats`` runs with other seeds (other weight sets), each run's ratio beside
  it, as one run's M weight sets give a ratio that varies by seed; the squared error also on the model grid (area
  averages), which separates what the grid cannot draw (texture finer than its pixel) from what the model got wrong;
- aleatoric: the case at three measurement noise levels (CT: photon count ``i0``; MRI: ``kspace_noise``): mean AU
  and EU at each.

Everything goes through the product's own reading and reconstruction path (``load_case`` and a
:class:`~hyper_dm.inference.VolumeReconstructor`). Run it as ``scripts/evaluate.py`` or the bundle's ``evaluate``
run id (``bundle/configs/evaluate.yaml``).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .calibration import LOCAL_EU_REFERENCE, TISSUE_FLOOR, Calibration, in_model_units
from .config import ConfigError
from .data import resolve_data_config, split_cases
from .data.config import FASTMRI_CENTER_FRACTIONS, MEASUREMENT_NOISE
from .data.intensity import to_hu
from .data.synthetic import (
    insert_bright_lesion,
    insert_checkered_knee_square,
    insert_checkered_square,
    insert_dense_disc,
)
from .inference import VolumeReconstructor, apply_calibration, case_metrics, load_case
from .inference.reconstructor import resize_slices
from .io import atomic_write
from .networks import DeepEnsemble
from .uncertainty import ause, central_z, psnr, sparsification_curves, ssim

__all__ = ["MRI_ACCELERATIONS", "OBJECTS", "evaluate", "write_report"]

MRI_ACCELERATIONS = {f"{a}x": {"accelerations": [a], "center_fractions": [c]}
                     for a, c in FASTMRI_CENTER_FRACTIONS.items()}
# per task, the unfamiliar objects painted into each test case: name -> (writer, file suffix, the report's words)
OBJECTS = {
    "ct": {"disc": (insert_dense_disc, ".nii.gz", "A dense striped 30 mm disc inserted in the right lung of each "
                    "test case (written as a NIfTI study and read back through the user path)."),
           "square": (insert_checkered_square, ".nii.gz", "A 30 mm square checkered 700 / 100 HU in 4 mm cells, in "
                      "the same place: another shape and texture, unlike the disc and the probes of the `eu` study "
                      "recipes.")},
    "mri": {"lesion": (insert_bright_lesion, ".h5", "A bright striped 12 mm lesion added to the image behind each "
                       "test file's k-space (written as a fastMRI .h5 and read back through the user path)."),
            "square": (insert_checkered_knee_square, ".h5", "The tissue in a 12 mm square, in the same place, "
                       "replaced by 4 mm checkers of bright signal and signal void: another shape and texture, unlike "
                       "the lesion and the probes of the `eu` study recipes.")},
}
NOISE_FIGURES = ("mean_au", "mean_eu", "mean_total", "rmse", "coverage_90", "coverage_90_calibrated")  # per level
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


def reliability(out: dict, label: torch.Tensor, calibration: Calibration | None,
                noise_level: torch.Tensor | None = None, gain: torch.Tensor | None = None,
                offset: torch.Tensor | None = None) -> dict[str, list[float]]:
    """Observed coverage of central Gaussian intervals at :data:`LEVELS`, raw and calibrated (the std scaled by
    the reference level's scale of each slice's ``noise_level [Z]`` bin and, with ``gain``/``offset`` ``[Z]``, of
    each pixel's intensity class and EU bin, :meth:`Calibration.scales_for`)."""
    error = (label - out["mean"]).abs().double()
    sigma = out["total"].double().clamp_min(0).sqrt()
    z = [central_z(level) for level in LEVELS]
    curves = {"raw": [float((error <= zi * sigma).double().mean()) for zi in z]}
    if calibration is not None:
        scaled = calibration.scales_for(out, noise_level, gain, offset) * sigma
        curves["calibrated"] = [float((error <= zi * scaled).double().mean()) for zi in z]
    return curves


def coverage_among(raw: dict, label: torch.Tensor, pixels: torch.Tensor, name: str) -> dict[str, float]:
    """Coverage of the central 90% intervals among ``pixels`` (an index or boolean mask into the flattened volume):
    raw and, where ``raw`` holds the calibrated std, calibrated, as ``coverage_90[_calibrated]_<name>``. ``raw``'s
    maps and ``label`` are ``[1, X, Y, Z]`` in physical units."""
    error = (raw["mean"] - label).abs().double().flatten()[pixels]
    stds = {"": raw["total"].double().clamp_min(0).sqrt()}
    if "total_std_calibrated" in raw:
        stds["_calibrated"] = raw["total_std_calibrated"].double()
    return {f"coverage_90{key}_{name}": float((error <= central_z(0.9) * std.flatten()[pixels]).double().mean())
            for key, std in stds.items()}


def top_eu_coverage(raw: dict, label: torch.Tensor, share: float = 0.1) -> dict[str, float]:
    """:func:`coverage_among` the ``share`` of pixels with the highest EU (where the weight sets disagree most)."""
    eu = raw["eu"].double().flatten()
    return coverage_among(raw, label, eu.topk(max(1, math.ceil(share * eu.numel()))).indices, "top_eu")


def tissue_coverage(raw: dict, label: torch.Tensor, gain: torch.Tensor, offset: torch.Tensor) -> dict[str, float]:
    """:func:`coverage_among` the tissue: pixels whose reference lies above :data:`~hyper_dm.calibration.TISSUE_FLOOR`
    (model units; ``gain``/``offset`` ``[Z]``: physical = gain * model + offset)."""
    return coverage_among(raw, label, in_model_units(label, gain, offset).flatten() > TISSUE_FLOOR, "tissue")


def median_slice_ratio(values: np.ndarray, inside: np.ndarray, reference: np.ndarray, region: np.ndarray) -> float:
    """Median over slices of the mean of ``values [X, Y, Z]`` inside the object (boolean ``inside``, like
    ``values``) over the mean of ``reference`` in ``region``."""
    return float(np.median([values[..., k][inside[..., k]].mean() / max(reference[..., k][region[..., k]].mean(), 1e-30)
                            for k in range(values.shape[-1])]))


def inside_over_body(values: np.ndarray, inside: np.ndarray, body: np.ndarray) -> float:
    """:func:`median_slice_ratio` of ``values`` inside the object over the rest of the ``body``."""
    return median_slice_ratio(values, inside, values, body & ~inside)


def on_model_grid(values: np.ndarray, size: int) -> np.ndarray:
    """``[X, Y, Z]`` -> ``[size, size, Z]`` float32 area averages: each slice as the model grid's pixels hold it."""
    slices = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).permute(2, 0, 1)[:, None]
    return resize_slices(slices, (size, size))[:, 0].permute(1, 2, 0).numpy()


def plot(path: Path, panels: list[tuple[str, callable]]) -> None:
    """One row of matplotlib panels ``(title, draw(ax))`` saved as a PNG."""
    fig = Figure(figsize=(4.2 * len(panels), 3.6))
    FigureCanvasAgg(fig)
    for ax, (title, draw) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        draw(ax)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=90)


def evaluate(reconstructor: VolumeReconstructor, data: dict, calibration: Calibration | None = None,
             cases: int | None = None, repeats: int = 3) -> dict:
    """Every measurement of the report on the first ``cases`` test cases of ``data`` (the bundle's ``data``
    section; all cases if None), reconstructed by ``reconstructor``; each case with an object ``repeats`` times
    (seeds ``reconstructor.seed + k``), its EU ratio taken on their mean EU map (M x ``repeats`` weight sets).
    Returns the lists :func:`write_report` reads: ``rows`` (quality and distribution per case and setting),
    ``reliability``, ``sparsity``, ``ood``, ``noise``, ``seconds_per_slice`` and the ``calibration``."""
    if repeats < 1:
        raise ConfigError(f"repeats (evaluate.py --repeats, evaluate_cfg#repeats) must be >= 1, got {repeats}")
    data = resolve_data_config(data)
    ct = data["task"] == "ct"
    size = int(data["img_size"])
    settings = {"": {}} if ct else MRI_ACCELERATIONS  # name -> data overrides (the measurement)
    noise_key, noise_levels = MEASUREMENT_NOISE[data["task"]]
    run = reconstructor.reconstruct_case

    def checked(case: dict, raw: dict) -> tuple[torch.Tensor, Calibration | None, dict]:
        """The noise level ``[Z]`` of ``case``'s slices, the calibration applied to it and the slices its input check
        flags, as inference finds them (:func:`~hyper_dm.inference.apply_calibration`; ``{}`` without calibration
        departures)."""
        applied = apply_calibration(raw, case, reconstructor, calibration)
        check = applied["input_check"]
        flags = {} if check is None else {"slices_flagged": check["slices_unlike_calibration"],
                                          "slices": int(raw["mean"].shape[-1]), "check_alpha": check["alpha"],
                                          **({"unfamiliar_fraction": check["unfamiliar_fraction"]}
                                             if "unfamiliar_fraction" in check else {})}
        return applied["noise_level"], applied["calibration"], flags

    def object_figures(case: dict, mask: np.ndarray, clean: np.ndarray, clean_out: dict) -> dict:
        """Inside the object (``mask [X, Y, Z]``, the loaded volume's order) against the rest of the body (the
        tissue of ``clean [X, Y, Z]``, the reference without the object, whose brightness cannot move it) and
        against the same pixels of the case without it (``clean_out``: its calibrated reconstruction): ratios of EU
        (the mean map of ``repeats`` runs, and each run's), squared error (on the output grid and on the model
        grid, where sub-grid detail averages out) and predicted variance, the (calibrated) 90% coverage, the
        fractions of pixels flagged unfamiliar (each run's, where the calibration records an EU threshold), the
        squared error of the mean on the rest of the body over the case without the object's (what the object costs
        the rest of the image), and the maps of the middle slice; all but EU and the flags from the first run."""
        raw = run(case)
        runs = [raw["eu"][0].numpy()] + [reconstructor.with_seed(reconstructor.seed + k).reconstruct_case(case)["eu"][0]
                                         .numpy() for k in range(1, repeats)]  # EU [X, Y, Z] of each run
        object_noise, applied, case_flags = checked(case, raw)  # adds the calibrated std and unfamiliar maps
        eu, reference = np.mean(runs, axis=0), case["label"][0].numpy()
        body = clean > -990 if ct else clean > 0.1 * clean.max()  # tissue, not air
        flagged = {}
        if "unfamiliar" in raw:
            run_flags = [applied.unfamiliar(torch.from_numpy(e)[None], case["gain"], object_noise)[0].numpy()
                         for e in runs]
            fraction = lambda region: [float(f[region].mean()) for f in run_flags]  # noqa: E731  one per run
            flagged = {"flagged_inside": fraction(mask), "flagged_body": fraction(body & ~mask),
                       "flagged_clean_body": float(clean_out["unfamiliar"][0].numpy()[body].mean())}
        error = np.abs(raw["mean"][0].numpy() - reference)
        std = (raw["total_std_calibrated"] if "total_std_calibrated" in raw
               else raw["total"].clamp_min(0).sqrt())[0].numpy()
        covered = error <= central_z(0.9) * std  # inside its 90% interval
        coarse = lambda x: on_model_grid(x, size)  # noqa: E731
        coarse_error = (coarse(raw["mean"][0].numpy()) - coarse(reference)) ** 2
        mid = eu.shape[-1] // 2
        return {"median_ratio": inside_over_body(eu, mask, body),
                "run_ratios": [inside_over_body(e, mask, body) for e in runs],
                "error_ratio": inside_over_body(error**2, mask, body),
                "grid_error_ratio": inside_over_body(coarse_error, coarse(mask) > 0.5, coarse(body) > 0.5),
                "total_ratio": inside_over_body(raw["total"][0].numpy(), mask, body),
                "same_place_ratio": median_slice_ratio(eu, mask, clean_out["eu"][0].numpy(), mask), **flagged,
                "body_error_ratio": float((error[body & ~mask] ** 2).mean()
                                          / ((clean_out["mean"][0].numpy() - clean)[body & ~mask] ** 2).mean()),
                "coverage_90_inside": float(covered[mask].mean()),
                "coverage_90_body": float(covered[body & ~mask].mean()),
                "eu_inside": float(eu[mask].mean()), "eu_body": float(eu[body & ~mask].mean()), **case_flags,
                "maps": {"input": F.interpolate(case["cond"][0, ..., mid][None, None], size=eu.shape[:2],
                                                mode="bilinear")[0, 0].numpy(),
                         "mean": raw["mean"][0, ..., mid].numpy(), "|error|": error[..., mid], "std": std[..., mid],
                         "eu": eu[..., mid], "au": raw["au"][0, ..., mid].numpy(),
                         **({"unfamiliar": raw["unfamiliar"][0, ..., mid].numpy()} if "unfamiliar" in raw else {})}}

    rows, reliab, sparsity, ood, noise, timings = [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for entry in split_cases(data, "test")[:cases]:
            entry = {"image": entry["image"], "case_id": entry["case_id"]}
            for setting, overrides in settings.items():
                setting_data = {**data, **overrides}
                start = time.perf_counter()
                case = load_case(entry, setting_data, "simulate", size)
                raw = run(case)
                timings.append((time.perf_counter() - start) / case["volume"].shape[-1])
                label = case["label"].float()
                data_range = 2000.0 if ct else float(2 * case["gain"].mean())
                case_noise, applied, flags = checked(case, raw)
                metrics = case_metrics(raw, label, data_range, applied, case_noise, case["gain"], case["offset"])
                error = (raw["mean"] - label).abs().flatten()
                total = raw["total"].flatten()
                stride = max(1, error.numel() // (1 << 20))
                random_ause = ause(torch.rand(error[::stride].shape, generator=torch.Generator().manual_seed(0)),
                                   error[::stride])
                slices = lambda x: x[0].permute(2, 0, 1)[:, None]  # noqa: E731
                rows.append({"case_id": entry["case_id"], "setting": setting, "input": input_quality(case, data_range),
                             **metrics, "nmse": nmse(slices(raw["mean"]), slices(label)), "ause_random": random_ause,
                             **top_eu_coverage(raw, label), **tissue_coverage(raw, label, case["gain"], case["offset"]),
                             **flags})
                reliab.append(reliability(raw, label, applied, case_noise, case["gain"], case["offset"]))
                sparsity.append([c.tolist() for c in sparsification_curves(total[::stride], error[::stride])])

                # epistemic: unfamiliar objects, as a user's files
                for name, (insert, suffix, _) in OBJECTS[data["task"]].items():
                    object_file = Path(tmp) / f"object{suffix}"
                    mask = insert(entry["image"], object_file)
                    ood.append({"case_id": entry["case_id"], "setting": setting, "object": name,
                                **object_figures(load_case({"image": str(object_file), "case_id": "object"},
                                                           setting_data, "simulate", size), mask,
                                                 case["label"][0].numpy(), raw)})

                # aleatoric: the same case at three measurement noise levels
                for level in noise_levels:
                    noisy = load_case(entry, {**setting_data, noise_key: level, **({"noise": "poisson"} if ct else {})},
                                      "simulate", size)
                    noisy_raw = run(noisy)
                    noisy_noise, noisy_applied, noisy_flags = checked(noisy, noisy_raw)
                    at_level = case_metrics(noisy_raw, noisy["label"].float(), data_range, noisy_applied, noisy_noise,
                                            noisy["gain"], noisy["offset"])
                    noise.append({"case_id": entry["case_id"], "setting": setting, "level": level,
                                  **{k: v for k, v in at_level.items() if k in NOISE_FIGURES}, **noisy_flags})

    network = reconstructor.network
    model = f"deep ensemble ({len(network.members)} models)" if isinstance(network, DeepEnsemble) else "Hyper-DM"
    return {"rows": rows, "reliability": reliab, "sparsity": sparsity, "ood": ood, "noise": noise,
            "seconds_per_slice": timings, "calibration": calibration, "model": model}


def write_report(out: str | Path, results: dict, data: dict, command: str, label: str = "") -> Path:
    """``report.md`` / ``report.json`` and their PNG plots in ``out`` (one section per measurement setting),
    from :func:`evaluate`'s ``results`` on ``data``; ``command`` is how the figures were made (quoted in the report),
    ``label`` a line on the model and its training budget. Every file is written atomically. Returns report.md."""
    out, data = Path(out), resolve_data_config(data)
    out.mkdir(parents=True, exist_ok=True)
    rows, reliab, sparsity, ood, noise = (results[k] for k in ("rows", "reliability", "sparsity", "ood", "noise"))
    ct = data["task"] == "ct"
    calibrated = "calibrated" in reliab[0]
    unit, var_unit = ("HU", "HU^2") if ct else ("a.u.", "a.u.^2")  # MRI: fastMRI magnitude units
    tissue_floor = (f"{to_hu(TISSUE_FLOOR, data['hu_window']):g} HU" if ct
                    else f"{(TISSUE_FLOOR + 1) / 2:.0%} of the magnitude scale")
    noise_name = "i0 (photons / bin)" if ct else "k-space noise std / magnitude scale"
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    levels = np.array(LEVELS)
    avg = lambda items, key: float(np.mean([i[key] for i in items]))  # noqa: E731
    checked = "slices_flagged" in rows[0]  # the calibration records input departures
    total = lambda items, key: int(sum(i[key] for i in items))  # noqa: E731
    fitted = results.get("calibration")
    unfamiliar = "unfamiliar_fraction" in rows[0]  # the calibration records an EU threshold
    of_bin = " of each slice's noise bin" if fitted and any(c.noise_eu_thresholds for c in fitted.groups) else ""
    flag_rule = "" if fitted is None or fitted.eu_threshold is None else (
        f"EU above the calibration's {fitted.eu_level:g} quantile{of_bin}"
        + (f", or the mean EU over a box {fitted.local_eu_window:g} of the slice's side, over the slice's "
           f"{LOCAL_EU_REFERENCE:g} EU quantile, above the calibration's {fitted.eu_level:g} quantile of that ratio"
           if fitted.local_eu_threshold is not None else ""))
    draws_note = ("the absolute threshold holds for the calibration's draw of weight sets; the local test divides "
                  "another draw's level of EU out" if fitted is not None and fitted.local_eu_threshold is not None
                  else "the threshold holds for one draw of weight sets, not for others")
    noise_rows = [{"setting": s, "level": lv,
                   **{k: avg(at, k) for k in (*NOISE_FIGURES, "unfamiliar_fraction") if k in noise[0]},
                   **({k: total(at, k) for k in ("slices_flagged", "slices")} if checked else {})}
                  for s in settings for lv in dict.fromkeys(n["level"] for n in noise)
                  for at in [[n for n in noise if n["setting"] == s and n["level"] == lv]]]
    flags = lambda items: f"{total(items, 'slices_flagged')} of {total(items, 'slices')}"  # noqa: E731
    plot(out / "calibration.png", [
        ("reliability (central intervals)", lambda ax: (
            ax.plot(levels, levels, "k--", label="ideal"),
            ax.plot(levels, np.mean([r["raw"] for r in reliab], axis=0), "o-", label="raw"),
            *([ax.plot(levels, np.mean([r["calibrated"] for r in reliab], axis=0), "s-", label="calibrated")]
              if calibrated else []),
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

    def show(image: np.ndarray, cmap: str, vmax: float | None = None) -> callable:
        return lambda ax: (ax.imshow(np.asarray(image).T, origin="lower", cmap=cmap, vmin=0 if vmax else None,
                                     vmax=vmax), ax.set_axis_off())

    objects = OBJECTS[data["task"]]
    figure_names = {name: "ood_object.png" if k == 0 else f"ood_object_{name}.png" for k, name in enumerate(objects)}
    std_name = f"{'calibrated ' if calibrated else ''}std ({unit})"
    for name, figure in figure_names.items():
        maps = next(o for o in ood if o["object"] == name)["maps"]  # the first case and setting
        shared = float(np.percentile(maps["|error|"], 99.5))  # |error| and the std on one scale: where one exceeds
        plot(out / figure, [("input", show(maps["input"], "gray")), ("mean", show(maps["mean"], "gray")),
                            (f"|error| ({unit})", show(maps["|error|"], "magma", shared)),
                            (std_name, show(maps["std"], "magma", shared)),
                            ("EU", show(maps["eu"], "magma")), ("AU", show(maps["au"], "magma")),
                            *([("unfamiliar (EU beyond calibration)", show(maps["unfamiliar"], "gray", 1.0))]
                              if "unfamiliar" in maps else [])])
    fmt = (lambda v: f"{v:.1f}") if ct else (lambda v: f"{v:.3g}")  # noqa: E731
    input_name = "FBP" if ct else "zero-filled"
    pitch = "the series' own pitch" if data["fbp_pitch"] == "source" else "the model grid"
    physics = (f"{data['n_views']} views, i0 {data['i0']:.0e} per detector bin, FBP made on {pitch}" if ct else
               f"{data['mask_type']} masks, " + ", ".join(f"{k} (center {v['center_fractions'][0]})"
                                                               for k, v in MRI_ACCELERATIONS.items()))
    text = [f"# Hyper-DM evaluation: {'sparse-view CT' if ct else 'accelerated single-coil knee MRI'}", "",
            label, "",
            f"Command: `{command}` ({len({r['case_id'] for r in rows})} test case(s), model grid "
            f"{data['img_size']} px, {physics}); {np.mean(results['seconds_per_slice']):.2f} s per slice here.", ""]
    for s in settings:
        sel = [r for r in rows if r["setting"] == s]
        per_object = {name: [x for x in ood if x["setting"] == s and x["object"] == name] for name in objects}
        nr = [n for n in noise_rows if n["setting"] == s]
        au, eu = [n["mean_au"] for n in nr], [n["mean_eu"] for n in nr]
        m = lambda key, sel=sel: avg(sel, key)  # noqa: E731
        each = lambda key, o, digits=2: ", ".join(f"{x[key]:.{digits}f}" for x in o)  # noqa: E731  one per case
        runs = lambda o, key="run_ratios", f="{:.2f}": "; ".join(  # noqa: E731
            " / ".join(f.format(r) for r in x[key]) for x in o)
        percent = lambda o, key: ", ".join(f"{100 * np.mean(x[key]):.2f}%" for x in o)  # noqa: E731 one per case
        first = lambda o, key: ", ".join(f"{100 * x[key][0]:.2f}%" for x in o)  # noqa: E731  the first run's
        i = lambda key, sel=sel: avg([r["input"] for r in sel], key)  # noqa: E731
        cal = ("| calibrated | " + " | ".join(f"{m(f'coverage_{q}_calibrated'):.3f}" for q in (50, 90, 95)) + " |"
               if calibrated else "| calibrated | (no calibration file given) | | |")
        text += [f"## {s + ' acceleration: ' if s else ''}quality (mean of the test cases)", "",
                 "| | PSNR (dB) | SSIM | NMSE |", "| --- | --- | --- | --- |",
                 f"| {input_name} (input) | {i('psnr_db'):.2f} | {i('ssim'):.3f} | {i('nmse'):.4f} |",
                 f"| {results['model']} mean | {m('psnr_db'):.2f} | {m('ssim'):.3f} | {m('nmse'):.4f} |", "",
                 f"Gain over {input_name}: {m('psnr_db') - i('psnr_db'):+.2f} dB.", "",
                 f"## {s + ' acceleration: ' if s else ''}distribution", "",
                 "| intervals | 50% | 90% | 95% |", "| --- | --- | --- | --- |",
                 f"| raw | {m('coverage_50'):.3f} | {m('coverage_90'):.3f} | {m('coverage_95'):.3f} |", cal, "",
                 f"CRPS {fmt(m('crps'))} {unit}; UCE {fmt(m('uce'))} {var_unit}; AUSE {m('ause'):.3f} (random "
                 f"ordering {m('ause_random'):.3f}); mean EU {fmt(m('mean_eu'))} {var_unit}, mean AU "
                 f"{fmt(m('mean_au'))} {var_unit}, RMSE {fmt(m('rmse'))} {unit} (squared {fmt(m('rmse') ** 2)} "
                 f"{var_unit} against a predicted total variance of {fmt(m('mean_total'))} {var_unit})."
                 + (f" Pixels flagged unfamiliar ({flag_rule}): "
                    f"{100 * m('unfamiliar_fraction'):.3f}% of the volume." if unfamiliar else "")
                 + f" Among the 10% of pixels with the highest EU, 90% intervals cover {m('coverage_90_top_eu'):.3f}"
                 + (f" raw, {m('coverage_90_calibrated_top_eu'):.3f} calibrated." if calibrated else ".")
                 + f" In the tissue (reference above {tissue_floor}) they cover {m('coverage_90_tissue'):.3f}"
                 + (f" raw, {m('coverage_90_calibrated_tissue'):.3f} calibrated." if calibrated else "."), "",
                 f"## {s + ' acceleration: ' if s else ''}epistemic: objects the training set never had", "",
                 *[line for name, o in per_object.items() for line in (
                   objects[name][2] + f" Median over slices of mean EU inside it / mean EU in the rest of the body, "
                   f"on the mean EU map of {len(o[0]['run_ratios'])} runs with other weight sets: "
                   f"{each('median_ratio', o)} (target >= 3); each run alone: {runs(o)}. The same ratio of the squared "
                   "error: "
                   f"{each('error_ratio', o)}, on the model grid's {data['img_size']} x {data['img_size']} pixels "
                   f"(area averages of the mean and the reference: the error the network could draw) "
                   f"{each('grid_error_ratio', o)}; of the predicted total variance: {each('total_ratio', o)}. "
                   f"{'Calibrated' if calibrated else 'Raw'} 90% intervals cover {each('coverage_90_inside', o, 3)} of "
                   f"its pixels ({each('coverage_90_body', o, 3)} in the rest of the body). EU inside it over EU "
                   f"on the same pixels of the case without it (median over slices, against one run): "
                   f"{each('same_place_ratio', o, 1)}. Outside it, on the rest of the body, the mean's squared error "
                   f"is {each('body_error_ratio', o)} times that of the case without it (what the object costs the "
                   "rest of the image)."
                   + (f" Pixels flagged unfamiliar as inference flags them ({flag_rule}, with the M weight sets "
                      "of the first run, those the "
                      f"calibration was fitted with when the seeds agree): {first(o, 'flagged_inside')} of the object, "
                      f"{first(o, 'flagged_body')} of the rest of the body, {percent(o, 'flagged_clean_body')} of the "
                      f"body without the object; each run's weight sets: {runs(o, 'flagged_inside', '{:.2%}')} of the "
                      f"object ({draws_note})." if "flagged_inside" in o[0] else "")
                   + (f" The input check flags {flags(o)} slices of the cases with the object (without it: "
                      f"{flags(sel)})." if checked else ""), "")],
                 f"## {s + ' acceleration: ' if s else ''}aleatoric: measurement noise", "",
                 f"| {noise_name} | mean AU ({var_unit}) | mean EU ({var_unit}) | RMSE ({unit}) | squared error / "
                 "predicted variance | 90% raw | 90% calibrated |" + (" slices flagged |" if checked else "")
                 + (" pixels flagged unfamiliar |" if unfamiliar else ""),
                 "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if checked else "")
                 + (" --- |" if unfamiliar else ""),
                 *[f"| {n['level']:.3g} | {fmt(n['mean_au'])} | {fmt(n['mean_eu'])} | {fmt(n['rmse'])} | "
                   f"{n['rmse'] ** 2 / max(n['mean_total'], 1e-30):.2f} | {n['coverage_90']:.3f} | "
                   + (f"{n['coverage_90_calibrated']:.3f} |" if calibrated else "- |")
                   + (f" {flags([n])} |" if checked else "")
                   + (f" {100 * n['unfamiliar_fraction']:.3f}% |" if unfamiliar else "") for n in nr],
                 "", f"AU rises strictly with the noise: {all(a < b for a, b in zip(au, au[1:], strict=False))}; "
                 f"relative change of AU {(au[-1] - au[0]) / max(au[0], 1e-30):+.2f}, of EU "
                 f"{(eu[-1] - eu[0]) / max(eu[0], 1e-30):+.2f}; in {var_unit}, EU moved "
                 f"{(eu[-1] - eu[0]) / max(abs(au[-1] - au[0]), 1e-30):+.3g} times as far as AU.", ""]
    references = lambda c: (f"{' / '.join(str(len(d)) for d in c.noise_departures)} per noise bin"  # noqa: E731
                            if c.noise_departures else f"{len(c.departures)}")
    alphas = " / ".join(f"{a:.3g}" for a in dict.fromkeys(r["check_alpha"] for r in rows if "check_alpha" in r))
    text += [f"Calibrated columns: split-conformal, {fitted.describe()}." if fitted else
             "Calibrated columns: no calibration file given.", "",
             *([f"Slices flagged: the input check of inference, a slice whose input the reconstruction moved at "
                f"least as far as all but a fraction {alphas} of the calibration slices of its noise bin"
                + (f" and acceleration ({'; '.join(f'{a}x: {references(c)}' for a, c in fitted.accelerations.items())})"
                   if fitted.accelerations else f" ({references(fitted)})")
                + " did (`Calibration.input_check`).", ""]
               if checked else []),
             "![calibration](calibration.png)", "",
             *[line for name, figure in figure_names.items() for line in (f"![{name}]({figure})", "")]]
    summary = {"model": results["model"], "rows": rows,
               "ood": [{k: v for k, v in o.items() if k != "maps"} for o in ood], "noise": noise_rows}
    with atomic_write(out / "report.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    with atomic_write(out / "report.md") as tmp:
        tmp.write_text("\n".join(text))
    return out / "report.md"

