"""Parallel-beam sparse-view CT: projection, measurement noise and filtered back-projection.

The projector is scikit-image's ``radon``/``iradon`` (a maintained implementation; at the 64 x 64 slices the
models train on one projection plus one FBP takes a few milliseconds on one CPU core, see
``scripts/benchmark_data.py``). Geometry: ``n_views`` angles evenly spaced over [0, 180) degrees, one detector
bin per image pixel across the full image diagonal (``circle=False``), so nothing in the square image falls
outside the field of view.

Units: images are linear attenuation coefficients ``mu`` in 1/mm; sinograms are line integrals
``p = integral of mu dl`` (dimensionless), so the pixel size in mm enters the projector. Noise models:

- ``"poisson"``: transmitted photon counts ``N ~ Poisson(i0 * exp(-p))``, ``p_noisy = -log(max(N, 1) / i0)``;
- ``"gaussian"``: ``p_noisy = p + sigma * n`` with ``n ~ N(0, 1)``;
- ``"none"``: ``p_noisy = p``.

Example::

    >>> ct = ParallelBeamCT(n_views=24, noise="poisson", i0=1e5)
    >>> mu = hu_to_mu(hu_slice)                       # [S, S] 1/mm
    >>> sino = ct.project(mu, pixel_mm=5.5)           # [n_det, n_views]
    >>> fbp_mu = ct.fbp(ct.add_noise(sino, np.random.default_rng(0)), pixel_mm=5.5, size=mu.shape[0])
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from skimage.transform import iradon, radon

__all__ = ["MU_WATER_PER_MM", "NoiseModel", "ParallelBeamCT", "hu_to_mu", "mu_to_hu"]

MU_WATER_PER_MM = 0.0192
"""Linear attenuation of water at about 70 keV (1/mm); HU = 1000 * (mu - mu_water) / mu_water (air: mu = 0)."""

NoiseModel = Literal["poisson", "gaussian", "none"]


def hu_to_mu(hu: np.ndarray) -> np.ndarray:
    """Hounsfield units -> attenuation in 1/mm, clipped at 0 (nothing attenuates less than vacuum)."""
    return np.maximum(MU_WATER_PER_MM * (1.0 + np.asarray(hu, dtype=np.float64) / 1000.0), 0.0)


def mu_to_hu(mu: np.ndarray) -> np.ndarray:
    """Attenuation in 1/mm -> Hounsfield units."""
    return 1000.0 * (np.asarray(mu, dtype=np.float64) / MU_WATER_PER_MM - 1.0)


class ParallelBeamCT:
    """Sparse-view parallel-beam acquisition with a configurable noise model.

    Args:
        n_views: number of projection angles, evenly spaced over [0, 180) degrees.
        noise: ``"poisson"``, ``"gaussian"`` or ``"none"``.
        i0: incident photons per detector bin (Poisson model); larger is less noisy.
        sigma: standard deviation of the additive Gaussian noise on the line integrals (Gaussian model).
        filter_name: FBP ramp filter variant passed to ``skimage.transform.iradon``.
    """

    def __init__(
        self,
        n_views: int = 24,
        noise: NoiseModel = "poisson",
        i0: float = 1e5,
        sigma: float = 0.0,
        filter_name: str = "ramp",
    ) -> None:
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        if noise not in ("poisson", "gaussian", "none"):
            raise ValueError(f"noise must be 'poisson', 'gaussian' or 'none', got {noise!r}")
        if noise == "poisson" and i0 <= 0:
            raise ValueError(f"i0 must be > 0 for Poisson noise, got {i0}")
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.n_views = n_views
        self.noise = noise
        self.i0 = float(i0)
        self.sigma = float(sigma)
        self.filter_name = filter_name
        self.theta_deg = np.arange(n_views, dtype=np.float64) * (180.0 / n_views)

    def project(self, mu: np.ndarray, pixel_mm: float) -> np.ndarray:
        """Line integrals of ``mu: [S, S]`` (1/mm) -> sinogram ``[n_det, n_views]``, ``n_det = ceil(S * sqrt(2))``."""
        return radon(np.asarray(mu, dtype=np.float64), theta=self.theta_deg, circle=False) * pixel_mm

    def add_noise(self, sino: np.ndarray, rng: np.random.Generator | np.random.RandomState,
                  i0: float | None = None) -> np.ndarray:
        """Noisy copy of the line integrals ``sino: [n_det, n_views]`` drawn with ``rng`` (Poisson: ``i0`` photons,
        default the configured count)."""
        if self.noise == "poisson":
            i0 = self.i0 if i0 is None else i0
            counts = rng.poisson(i0 * np.exp(-sino))
            return -np.log(np.maximum(counts, 1) / i0)
        if self.noise == "gaussian":
            return sino + self.sigma * rng.standard_normal(sino.shape)
        return sino.copy()

    def fbp(self, sino: np.ndarray, pixel_mm: float, size: int) -> np.ndarray:
        """Filtered back-projection of ``sino: [n_det, n_views]`` -> attenuation image ``[size, size]`` in 1/mm."""
        return iradon(sino / pixel_mm, theta=self.theta_deg, output_size=size, filter_name=self.filter_name,
                      circle=False)
