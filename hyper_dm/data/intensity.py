"""Model-range intensity mapping and its inverse.

The models see every image in [-1, 1]:

- CT: HU clipped to ``hu_window = [lo, hi]`` and scaled linearly, ``x = 2 (hu - lo) / (hi - lo) - 1``
  (done in the pipeline by MONAI's ``ScaleIntensityRanged``); :func:`to_hu` inverts it.
- MRI: magnitudes divided by a per-sample ``scale`` (the ``"scale"`` key of each sample: the file's stored
  maximum, or the slice maximum, see ``mri_norm``), ``x = 2 m / scale - 1`` clipped to [-1, 1];
  :func:`to_magnitude` inverts it.

:func:`denormalise` picks the right inverse from the data config and a sample (or a collated batch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

__all__ = ["denormalise", "from_magnitude", "to_hu", "to_magnitude"]

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


def denormalise(data: Mapping, x: torch.Tensor, sample: Mapping | None = None, variance: bool = False) -> torch.Tensor:
    """Map model-range ``x: [B, C, H, W]`` or ``[C, H, W]`` back to HU (CT) or magnitude (MRI).

    Args:
        data: resolved data config (uses ``task`` and ``hu_window``).
        x: image(s) in the model range, or variances of them if ``variance``.
        sample: the sample or collated batch ``x`` came from (MRI: its ``"scale"``, float or ``[B]``).
        variance: ``x`` is a variance map (EU/AU/total): scale by the squared gain only, HU^2 or magnitude^2.
    """
    if data["task"] == "ct":
        lo, hi = float(data["hu_window"][0]), float(data["hu_window"][1])
        return x * (0.5 * (hi - lo)) ** 2 if variance else to_hu(x, (lo, hi))
    if sample is None or "scale" not in sample:
        raise ValueError("MRI denormalisation needs the sample (or batch) with its 'scale' key")
    scale = torch.as_tensor(sample["scale"], dtype=x.dtype, device=x.device)
    if scale.ndim == 1 and x.ndim == 4:
        scale = scale.view(-1, 1, 1, 1)
    return x * (0.5 * scale) ** 2 if variance else to_magnitude(x, scale)
