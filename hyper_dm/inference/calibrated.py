"""A fitted calibration applied to one reconstructed case, the same in every place that reconstructs.

The bundle's inference workflow, :meth:`HyperDM.reconstruct` and the MONAI Label app all call
:func:`apply_calibration`: it adds the calibrated std map, reads the measurement noise the calibration bins on,
runs the input check, and warns (naming the case) when the input lies outside what the calibration saw.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from ..calibration import Calibration, input_departure
from ..io import sha256_file
from .reconstructor import VolumeReconstructor

__all__ = ["apply_calibration", "load_calibration", "mask_acceleration", "scale_like_calibration"]

logger = logging.getLogger("hyper_dm.inference")


def load_calibration(path: str | Path | None, checkpoint: str | Path | None = None) -> Calibration | None:
    """The calibration at ``path`` (``None`` if ``path`` is ``None`` or absent, logged); a calibration fitted for
    another checkpoint than ``checkpoint`` is used with a warning."""
    if path is None or not Path(path).is_file():
        logger.info("no calibration file%s: writing raw uncertainty maps only (fit one with the 'calibrate' run id)",
                    f" at {path}" if path else "")
        return None
    calibration = Calibration.load(path)
    if checkpoint and Path(checkpoint).is_file() and calibration.checkpoint_sha256 \
            and calibration.checkpoint_sha256 != sha256_file(checkpoint):
        logger.warning("%s was fitted for another checkpoint than %s; refit it with the 'calibrate' run id", path,
                       checkpoint)
    logger.info("calibrated std = scale x raw std, from %s: %s", path, calibration.describe())
    return calibration


def mask_acceleration(case: Mapping) -> float | None:
    """MRI: k-space columns per sampled column of the case's mask; CT: ``None``."""
    mask = case.get("kspace_mask")
    return None if mask is None else float(mask.size / max(int(mask.sum()), 1))


def scale_like_calibration(case: Mapping, calibration: Calibration | None) -> Mapping:
    """The case to reconstruct: an MRI case whose magnitude scale came from its zero-filled image alone (a
    challenge file without ``max``: ``scale_ratio`` is ``None``) gets that scale times the calibration's
    :attr:`~hyper_dm.calibration.Calibration.scale_ratio` (its ``gain``/``offset`` likewise, and the ratio used as
    ``scale_ratio_applied``); without one recorded the case is kept and a warning names it. Any other case is
    returned as it is."""
    if "scale_ratio" not in case or case["scale_ratio"] is not None:
        return case
    name = f"case {case['case_id']}" if "case_id" in case else "the volume"
    fitted = None if calibration is None else calibration.at_acceleration(mask_acceleration(case))
    if fitted is None or fitted.scale_ratio is None:
        logger.warning("%s: no fully sampled max (fastMRI's 'max' attribute), so the magnitude scale is the "
                       "zero-filled image's peak, lower than the scale the model trained on (the missing columns "
                       "blur it): the input reads brighter than in training and EU and the unfamiliar map read high; "
                       "a calibration from the 'calibrate' run id records the ratio that corrects it", name)
        return case
    ratio = fitted.scale_ratio
    logger.info("%s: no fully sampled max, so the magnitude scale is the zero-filled image's peak times %.3f, the "
                "calibration's median ratio%s (its cases: %.3f-%.3f)", name, ratio,
                "" if fitted.acceleration is None else f" at {fitted.acceleration:g}x", *fitted.scale_ratio_range)
    return {**case, "gain": case["gain"] * ratio, "offset": case["offset"] * ratio, "scale_ratio_applied": ratio}


def apply_calibration(raw: dict[str, torch.Tensor], case: Mapping, reconstructor: VolumeReconstructor,
                      calibration: Calibration | None) -> dict:
    """Calibrate the reconstruction ``raw`` (``mean``, ``total``, ... ``[1, X, Y, Z]``, physical units) of ``case``
    (:func:`~hyper_dm.inference.load_case`'s dict) in place, and say how far its input is from the calibration's.

    With a calibration, ``raw`` gains ``total_std_calibrated`` (physical units, not squared): the raw total std
    times the scale of each slice's noise bin (MRI: in the calibration of the acceleration nearest the case's mask),
    and, where the calibration records an EU threshold, ``unfamiliar`` (1 where EU, or its local contrast, exceeds
    it, else 0; see :meth:`~hyper_dm.calibration.Calibration.unfamiliar`), whose fraction of the volume the input
    check holds as ``unfamiliar_fraction``.
    Returns ``noise_level`` ``[Z]`` (model units, what the network reads from each slice), ``departure`` ``[Z]``
    (:func:`~hyper_dm.calibration.input_departure`), ``acceleration`` (MRI: k-space columns per sampled column;
    CT: ``None``), ``calibration`` (the one applied) and ``input_check`` (:meth:`Calibration.input_check`, with
    ``mask_acceleration`` and ``calibration_acceleration`` where one calibration per acceleration was fitted;
    ``None`` without a calibration that records departures).
    """
    name = f"case {case['case_id']}" if "case_id" in case else "the volume"
    noise = reconstructor.noise_levels(case["cond"], case["gain"], case["offset"])
    departure = input_departure(case["cond"], raw["mean"], case["gain"])
    acceleration = mask_acceleration(case)
    applied = {"noise_level": noise, "departure": departure, "acceleration": acceleration}
    if calibration is None:
        return {**applied, "calibration": None, "input_check": None}
    pooled, calibration = calibration, calibration.at_acceleration(acceleration)
    if calibration.acceleration is not None and abs(math.log(acceleration / calibration.acceleration)) > math.log(1.3):
        logger.warning("%s: its mask samples one k-space column in %.2f, far from every calibrated acceleration "
                       "(%s); it takes the %gx calibration, whose intervals may not hold for it (add its acceleration "
                       "to inference_cfg#calibration_accelerations and recalibrate)", name, acceleration,
                       ", ".join(f"{a}x" for a in pooled.accelerations),
                       calibration.acceleration)
    used = {"M": reconstructor.m_weights, "N": reconstructor.n_draws, "steps": len(reconstructor.sampler.timesteps),
            "seed": reconstructor.seed, "weight_draws": reconstructor.weight_draws}
    fitted = {**calibration.sampling, "weight_draws": calibration.sampling.get("weight_draws", "iid")}  # before 0.11
    if calibration.sampling and fitted != {k: used[k] for k in fitted}:
        differs = {k for k in ("M", "N", "seed", "weight_draws") if fitted.get(k, used[k]) != used[k]}
        (logger.warning if differs else logger.info)(
            "%s: reconstructed with %s, the calibration with %s: its scales and EU threshold hold for its own "
            "settings (other weight sets give another EU: with M = 4 its level varies several-fold from seed to "
            "seed, and fewer weight sets or draws give a noisier one, whose calibrated intervals then fall short)%s",
            name, used, fitted, f"; scales for M = {used['M']}, N = {used['N']} come from the 'calibrate' run id with "
            f"--inference_cfg#M {used['M']} --inference_cfg#N {used['N']}" if differs & {"M", "N"} else "")
    scales = calibration.scales_for(raw, noise, case["gain"], case["offset"])
    raw["total_std_calibrated"] = scales.float() * raw["total"].clamp_min(0).sqrt()
    low, high = calibration.noise_range or (0.0, float("inf"))
    if not low <= float(noise.median()) <= high:
        logger.warning("%s: its median measurement noise %.3g (model units) is outside the calibrated range "
                       "%.3g-%.3g; its slices take the nearest noise bin's scale", name, float(noise.median()), low,
                       high)
    check = calibration.input_check(departure, noise) if calibration.departures else None
    if check is not None and calibration.acceleration is not None:
        check.update(mask_acceleration=round(acceleration, 2), calibration_acceleration=calibration.acceleration)
    if check is not None and "scale_ratio_applied" in case:
        check["zero_filled_scale_ratio"] = case["scale_ratio_applied"]
    if calibration.eu_threshold is None:
        logger.info("%s: the calibration holds no EU threshold, so no unfamiliar-pixel map is written (refit it with "
                    "the 'calibrate' run id)", name)
    else:
        flagged = calibration.unfamiliar(raw["eu"], case["gain"], noise)
        raw["unfamiliar"] = flagged.float()
        fraction = float(flagged.double().mean())
        if check is not None:
            check["unfamiliar_fraction"] = fraction
        usual = calibration.eu_flagged_max if calibration.eu_flagged_max is not None else 1 - calibration.eu_level
        (logger.warning if fraction > usual else logger.info)(
            "%s: %d pixels (%.3g%% of the volume; at most %.3g%% in any calibration case) have EU%s beyond the "
            "calibration's %g quantile: the weight sets disagree there as on nothing the model was calibrated on "
            "(the unfamiliar map)", name, int(flagged.sum()), 100 * fraction, 100 * usual,
            "" if calibration.local_eu_threshold is None else ", or EU against the rest of their slice,",
            calibration.eu_level)
    if check is not None and check["input_unlike_calibration"]:
        logger.warning("%s: the reconstruction moved its input's coarse content further than on the "
                       "calibration slices (median departure %.3g model units, calibrated up to %.3g; %d of %d "
                       "slices at p <= %.3g): the input is unlike what the model was trained and calibrated on "
                       "(another reconstruction pitch or kernel, photon starvation, metal?), and its uncertainty "
                       "maps likely understate the error", name, check["input_departure_median"],
                       calibration.departures[-1], check["slices_unlike_calibration"], departure.numel(),
                       check["alpha"])
    return {**applied, "calibration": calibration, "input_check": check}
