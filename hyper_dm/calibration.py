"""Split-conformal calibration of the predicted standard deviation.

On held-out cases with a reference (the validation split) each pixel gives a standardised residual
``r = |label - mean| / sqrt(total)``. For a central interval ``mean +- z_level * s * sqrt(total)`` to cover a
fraction ``level`` of new pixels, the scale is ``s = r_(k) / z_level`` with ``r_(k)`` the ``k = ceil((n + 1) level)``-th
smallest of ``n`` residuals (split-conformal). One scale per level is fitted; the calibrated standard deviation map
uses the scale of ``reference_level`` (90%). Pixels are exchangeable only approximately (neighbours correlate), so
the guarantee is empirical: coverage on the test split is reported raw and calibrated.

Example::

    >>> calibration = fit_calibration([residuals_case1, residuals_case2], source="bundle/models/model.pt")
    >>> calibration.save("bundle/models/calibration.json")
    >>> std = calibration.scale * total.sqrt()                  # calibrated standard deviation (units)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .io import atomic_write

__all__ = ["LEVELS", "Calibration", "fit_calibration", "standardised_residuals"]

LEVELS = (0.5, 0.9, 0.95)
_VARIANCE_FLOOR = 1e-12  # model units^2: keeps r finite where the model predicts no spread at all


def standardised_residuals(mean: torch.Tensor, total: torch.Tensor, label: torch.Tensor, gain: float = 1.0,
                           max_pixels: int = 1 << 20) -> torch.Tensor:
    """``|label - mean| / sqrt(total)`` on at most ``max_pixels`` pixels (a fixed stride), float64, flattened.

    ``gain`` (physical units per model unit) sets the variance floor ``1e-12 gain^2``."""
    stride = max(1, mean.numel() // max_pixels)
    error = (label - mean).flatten()[::stride].double().abs()
    sigma = (total.flatten()[::stride].double().clamp_min(0) + _VARIANCE_FLOOR * gain**2).sqrt()
    return error / sigma


def _z(level: float) -> float:
    return math.sqrt(2) * torch.erfinv(torch.tensor(level, dtype=torch.float64)).item()


@dataclass
class Calibration:
    """Scales of the predicted std per central-interval level, fitted on ``n_pixels`` residuals of ``n_cases``."""

    scales: dict[str, float]
    n_pixels: int
    n_cases: int
    checkpoint_sha256: str = ""
    reference_level: float = 0.9
    raw_coverage: dict[str, float] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """The std multiplier of ``reference_level`` (what the calibrated maps use)."""
        return self.scales[str(self.reference_level)]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration JSON; a malformed file is an error naming it."""
        try:
            content = json.loads(Path(path).read_text())
            calibration = cls(**content)
            if not (calibration.scale > 0 and math.isfinite(calibration.scale)):
                raise ValueError(f"scale {calibration.scale} is not a positive number")
        except (OSError, TypeError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: not a usable Hyper-DM calibration file ({e}); refit it with the 'calibrate' "
                             "run id or set inference_cfg#calibration to null") from e
        return calibration


def fit_calibration(residuals: Sequence[torch.Tensor], checkpoint_sha256: str = "",
                    levels: Sequence[float] = LEVELS, reference_level: float = 0.9) -> Calibration:
    """Split-conformal std scales from per-case standardised residuals (see the module docstring)."""
    if reference_level not in levels:
        raise ValueError(f"reference_level {reference_level} must be one of the levels {list(levels)}")
    r = torch.cat([x.flatten().double() for x in residuals]).sort().values
    n = r.numel()
    if n == 0:
        raise ValueError("no residuals to calibrate on (no validation case with a reference?)")
    scales, raw = {}, {}
    for level in levels:
        k = min(n, math.ceil((n + 1) * level))
        scales[str(level)] = float(r[k - 1]) / _z(level)
        raw[str(level)] = float((r <= _z(level)).double().mean())
    return Calibration(scales=scales, n_pixels=n, n_cases=len(residuals), checkpoint_sha256=checkpoint_sha256,
                       reference_level=reference_level, raw_coverage=raw)
