"""The ``data`` config section: keys, checks, and the default synthetic dataset.

Keys (the defaults are the ``data`` section of the bundle's ``common.yaml``, see :func:`resolve_data_config`):

=====================  ==========================================================================================
``task``               ``"ct"`` (LUNA16 sparse-view CT) or ``"mri"`` (fastMRI knee single-coil)
``dataset_dir``        dataset root; ``None``: the synthetic set under ``synthetic_dir`` (written on first use)
``synthetic_dir``      where the synthetic sets live (``<synthetic_dir>/luna16_seed<k>``, ``.../fastmri_knee_seed<k>``)
``synthetic_seed``     seed k of the synthetic set (part of its folder name: a new seed writes a new set)
``img_size``           S: slices are resized to S x S
``split_seed``         seed of the case-level split and of the validation/test physics
``train_frac``         fraction of patients in ``training``
``val_frac``           fraction in ``validation``; the rest is ``test``
``on_bad_file``        ``"raise"`` or ``"skip"`` (log and count) for unusable files
``cache_dir``          ``None``: in-memory ``CacheDataset``; a path: ``PersistentDataset`` under it
``cache_workers``      threads that fill the in-memory cache
``hu_window``          CT: ``[lo, hi]`` HU clipped and mapped linearly to [-1, 1]
``n_views``            CT: projection angles over 180 degrees
``noise``              CT: ``"poisson"``, ``"gaussian"`` or ``"none"``
``i0``                 CT: incident photons per detector bin (Poisson): validation, test, simulated inference
``i0_range``           CT: ``[low, high]``: training draws i0 log-uniformly per slice, so AU learns the noise
                       level from the image; ``None``: training uses ``i0`` too
``sigma``              CT: std of additive noise on the line integrals (Gaussian)
``fbp_pitch``          CT: where simulated FBPs are made: ``"model"``, on the S x S grid (detector bins of its
                       pitch); ``"source"``, at the series' own pixel pitch as a scanner reconstructs (``i0`` per bin
                       of that pitch), clipped to ``hu_window`` and area-averaged to S x S as inference reads it
``mask_type``          MRI: ``"random"`` or ``"equispaced"`` (fastMRI mask functions)
``center_fractions``   MRI: fully sampled central fraction(s) of the phase-encode columns
``accelerations``      MRI: acceleration(s), same length as ``center_fractions``
``mri_norm``           MRI: ``"volume_max"`` (file ``max`` attribute) or ``"slice_max"`` as the magnitude scale
``kspace_noise``       MRI: std of complex Gaussian noise added to k-space before the mask, as a fraction of the
                       magnitude scale: validation, test, simulated inference (0: the data's own noise only)
``kspace_noise_range`` MRI: ``[low, high]``: training draws the std uniformly per slice, so AU learns the noise
                       level; ``None``: training uses ``kspace_noise`` too
=====================  ==========================================================================================
"""

from __future__ import annotations

import difflib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from ..config import BUNDLE_CONFIGS, COMMON_CONFIG, bundle_section

__all__ = ["FASTMRI_CENTER_FRACTIONS", "MEASUREMENT_NOISE", "dataset_root", "fastmri_center_fraction",
           "resolve_data_config"]

logger = logging.getLogger(__name__)

MEASUREMENT_NOISE = {"ct": ("i0", (1e5, 1e4, 1e3)), "mri": ("kspace_noise", (0.0, 0.1, 0.3))}
"""Per task, the ``data`` key of the measurement noise and the three levels that the evaluation report probes and
calibration fits on: CT photon counts (highest dose first), MRI k-space noise std / magnitude scale."""
FASTMRI_CENTER_FRACTIONS = {4: 0.08, 8: 0.04}
"""fastMRI's knee masks: the fully sampled centre fraction that goes with each acceleration."""


def fastmri_center_fraction(acceleration: float) -> float:
    """The centre fraction of a mask at ``acceleration``: fastMRI's for 4x and 8x, else ``0.32 / acceleration``,
    the rule both of fastMRI's pairs follow (6x: 0.053). An acceleration of 1 or less is an error naming it."""
    if not acceleration > 1:
        raise ValueError(f"acceleration {acceleration!r} is not above 1 (k-space columns per sampled column)")
    return FASTMRI_CENTER_FRACTIONS.get(acceleration, 0.32 / acceleration)

_CHOICES = {"task": ("ct", "mri"), "on_bad_file": ("raise", "skip"), "noise": ("poisson", "gaussian", "none"),
            "mask_type": ("random", "equispaced"), "mri_norm": ("volume_max", "slice_max"),
            "fbp_pitch": ("model", "source")}


def resolve_data_config(data: Mapping) -> dict:
    """``data`` merged over the ``data`` section of the bundle's ``common.yaml`` and checked.

    Its keys are the known keys: any other is an error that lists the close matches.

    Example:
        >>> resolve_data_config({"task": "mri"})["accelerations"]
        [4]
    """
    defaults = bundle_section("data")
    unknown = [k for k in data if k not in defaults]
    if unknown:
        hints = {k: difflib.get_close_matches(k, defaults, n=3) for k in unknown}
        raise KeyError(f"unknown data config key(s) (known: the data section of {BUNDLE_CONFIGS / COMMON_CONFIG}): "
                       + "; ".join(f"{k!r} (did you mean {', '.join(map(repr, m))}?)" if m else repr(k)
                                   for k, m in hints.items()))
    out = {**defaults, **data}
    for key, allowed in _CHOICES.items():
        if out[key] not in allowed:
            raise ValueError(f"data.{key} must be one of {allowed}, got {out[key]!r}")
    lo, hi = out["hu_window"]
    if not lo < hi:
        raise ValueError(f"data.hu_window must be [lo, hi] with lo < hi, got {out['hu_window']}")
    if not (0 < out["train_frac"] and 0 <= out["val_frac"] and out["train_frac"] + out["val_frac"] <= 1):
        raise ValueError(f"need 0 < train_frac, 0 <= val_frac, train_frac + val_frac <= 1; got "
                         f"{out['train_frac']}, {out['val_frac']}")
    i0_range = out["i0_range"]
    if i0_range is not None and not (len(i0_range) == 2 and 0 < i0_range[0] <= i0_range[1]):
        raise ValueError(f"data.i0_range must be null or [low, high] photons with 0 < low <= high, got "
                         f"{out['i0_range']}")
    noise_range = out["kspace_noise_range"]
    if out["kspace_noise"] < 0 or (noise_range is not None and not (len(noise_range) == 2
                                                                    and 0 <= noise_range[0] <= noise_range[1])):
        raise ValueError(f"data.kspace_noise must be >= 0 and data.kspace_noise_range null or [low, high] with "
                         f"0 <= low <= high, got {out['kspace_noise']} and {noise_range}")
    if int(out["img_size"]) < 8:
        raise ValueError(f"data.img_size must be >= 8, got {out['img_size']}")
    return out


def dataset_root(data: Mapping) -> Path:
    """The dataset folder for a resolved config: ``dataset_dir``, or the synthetic set (written if missing).

    The synthetic set is written to a temporary folder and renamed into place, so concurrent processes (DDP
    ranks) never see a half-written set.
    """
    if data["dataset_dir"] is not None:
        return Path(data["dataset_dir"])
    from . import synthetic

    name = f"{'luna16' if data['task'] == 'ct' else 'fastmri_knee'}_seed{int(data['synthetic_seed'])}"
    root = Path(data["synthetic_dir"]) / name
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root.parent))
    if data["task"] == "ct":
        synthetic.write_luna16_like(tmp, seed=int(data["synthetic_seed"]))
    else:
        synthetic.write_fastmri_knee_like(tmp, seed=int(data["synthetic_seed"]))
    try:
        os.rename(tmp, root)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("data.dataset_dir is null: wrote the synthetic %s set to %s (%.1f s)", name, root,
                time.perf_counter() - start)
    return root
