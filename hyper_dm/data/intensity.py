"""Model-range intensity mapping and its inverse.

The models see every image in [-1, 1]:

- CT: HU clipped to ``hu_window = [lo, hi]`` and scaled linearly, ``x = 2 (hu - lo) / (hi - lo) - 1``
  (done in the pipeline by MONAI's ``ScaleIntensityRanged``); :func:`to_hu` inverts it.
- MRI: magnitudes divided by a per-sample ``scale`` (the ``"scale"`` key of each sample: the file's stored
  maximum, or the slice maximum, see ``mri_norm``), ``x = 2 m / scale - 1`` clipped to [-1, 1];
  :func:`to_magnitude` inverts it.

Every sample carries the affine map back to physical units as ``intensity_scale``/``intensity_offset``
(:func:`physical_map`), which the inference writer applies (``scale ** 2`` for variance maps).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["from_magnitude", "physical_map", "to_hu", "to_magnitude"]

Array = torch.Tensor | np.ndarray


def to_hu(x: Array, hu_window: Sequence[float]) -> Array:
    """Model range [-1, 1] -> HU for the window ``[lo, hi]`` (same type and shape as ``x``)."""
    lo, hi = float(hu_window[0]), float(hu_window[1])
    return lo + (x + 1.0) * (0.5 * (hi - lo))


def from_magnitude(m: Array, scale: float | Array) -> Array:
    """MRI magnitude -> model range: ``2 m / scale - 1`` clipped to [-1, 1]."""
    x = 2.0 * m / scale - 1.0
    return x.clamp(-1.0, 1.0) if isinstance(x, torch.Tensor) else np.clip(x, -1.0, 1.0)


def to_magnitude(x: Array, scale: float | Array) -> Array:
    """Model range -> MRI magnitude: ``(x + 1) scale / 2``."""
    return (x + 1.0) * (0.5 * scale)


def physical_map(task: str, hu_window: Sequence[float], magnitude_scale: float | None = None) -> tuple[float, float]:
    """``(gain, offset)`` with ``physical = gain * x + offset`` (HU for CT, magnitude for MRI).

    Variances (EU, AU, total) map by ``gain ** 2``. MRI needs the sample's ``magnitude_scale`` (its ``"scale"``).
    """
    if task == "ct":
        lo, hi = float(hu_window[0]), float(hu_window[1])
        return 0.5 * (hi - lo), 0.5 * (hi + lo)
    if magnitude_scale is None:
        raise ValueError("the MRI intensity map needs the sample's magnitude scale (its 'scale' key)")
    return 0.5 * float(magnitude_scale), 0.5 * float(magnitude_scale)
