"""One number per study for active learning: the mean epistemic variance over the body.

The body is found on the reconstruction itself, slice by slice: CT voxels above -500 HU (soft tissue, bone) with
the holes filled, so the lungs inside the chest wall count and the air around the patient does not; MRI voxels
above 10% of the volume's 99th percentile magnitude, holes filled. A volume with no body (blank) falls back to
all voxels.

Example::

    >>> out = HyperDM.from_bundle("model.pt").reconstruct("study.nii.gz", M=4, N=4)
    >>> uncertainty_summary(out, task="ct")       # {"mean_eu_body": ..., "mean_au_body": ..., ...}
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from scipy.ndimage import binary_fill_holes

__all__ = ["BODY_HU", "body_mask", "uncertainty_summary"]

BODY_HU = -500.0
"""CT: voxels of the mean reconstruction above this (HU) outline the body before its holes are filled."""


def body_mask(mean: torch.Tensor, task: str) -> np.ndarray:
    """Boolean ``[X, Y, Z]`` body mask of a mean reconstruction ``[1, X, Y, Z]`` (HU for CT, magnitude for MRI),
    axial slices along the last axis."""
    volume = np.asarray(mean[0], dtype=np.float32)
    threshold = BODY_HU if task == "ct" else 0.1 * float(np.percentile(volume, 99))
    tissue = volume > threshold
    return np.stack([binary_fill_holes(tissue[..., k]) for k in range(volume.shape[-1])], axis=-1)


def uncertainty_summary(outputs: Mapping[str, torch.Tensor], task: str) -> dict[str, float]:
    """Study summary of ``mean``/``eu``/``au`` ``[1, X, Y, Z]`` maps: ``mean_eu_body`` and ``mean_au_body``
    (units^2: HU^2 for CT), ``max_eu`` and ``body_fraction`` (share of voxels in the body)."""
    body = body_mask(outputs["mean"], task)
    if not body.any():
        body = np.ones_like(body)
    eu = np.asarray(outputs["eu"][0], dtype=np.float64)
    au = np.asarray(outputs["au"][0], dtype=np.float64)
    return {"mean_eu_body": float(eu[body].mean()), "mean_au_body": float(au[body].mean()),
            "max_eu": float(eu.max()), "body_fraction": float(body.mean())}
