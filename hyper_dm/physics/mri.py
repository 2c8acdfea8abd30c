"""Single-coil Cartesian MRI: fastMRI's k-space convention, undersampling masks, zero-filled reconstruction.

k-space convention (fastMRI's ``fastmri.fft2c``/``ifft2c``): centered orthonormal 2-D DFT over the last two
axes, ``kspace = fftshift(fft2(ifftshift(image), norm="ortho"))``. Knee single-coil k-space is
``[640, 368]`` (readout x phase encode) with 2x readout oversampling; the reconstruction is the magnitude of
the inverse transform center-cropped to ``[320, 320]``.

Masks are fastMRI's own ``MaskFunc`` (``fastmri.data.subsample``): whole phase-encode columns (the last axis)
are kept; ``center_fractions`` of the columns around DC are always kept and the rest are drawn to reach the
acceleration. A mask is a pure function of ``seed``: the same seed gives the same mask.

Measurement noise (:func:`add_kspace_noise`): white complex Gaussian noise on every k-space sample before the mask;
with the orthonormal DFT its per-component std is also the noise std of each complex image pixel.

Example::

    >>> mask_func = make_mask_func("random", [0.08], [4])
    >>> masked, mask = undersample(kspace, mask_func, seed=1234)     # kspace: [640, 368] complex64
    >>> cond = zero_filled(masked)                                   # [320, 320] float32 magnitude
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from fastmri.data.subsample import MaskFunc, create_mask_for_mask_type

__all__ = ["MaskType", "add_kspace_noise", "center_crop", "fft2c", "ifft2c", "make_mask_func", "undersample",
           "zero_filled"]

MaskType = Literal["random", "equispaced"]


def fft2c(image: np.ndarray) -> np.ndarray:
    """Centered orthonormal 2-D DFT over the last two axes: image ``[..., H, W]`` -> k-space ``[..., H, W]``."""
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(image, axes=axes), norm="ortho"), axes=axes)


def ifft2c(kspace: np.ndarray) -> np.ndarray:
    """Inverse of :func:`fft2c`: k-space ``[..., H, W]`` -> complex image ``[..., H, W]``."""
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace, axes=axes), norm="ortho"), axes=axes)


def add_kspace_noise(kspace: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """``kspace [..., H, W]`` plus complex Gaussian noise of std ``std`` per real and imaginary part (complex64).

    Example:
        >>> noisy = add_kspace_noise(np.zeros((640, 368), np.complex64), 0.5, np.random.default_rng(0))
        >>> round(float(ifft2c(noisy).real.std()), 2)  # the image sees the same std (orthonormal DFT)
        0.5
    """
    if std < 0:
        raise ValueError(f"k-space noise std must be >= 0, got {std}")
    if std == 0:
        return kspace.astype(np.complex64)
    noise = rng.standard_normal((2, *kspace.shape), dtype=np.float32) * np.float32(std)
    return (kspace + (noise[0] + 1j * noise[1])).astype(np.complex64)


def center_crop(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Central ``shape`` crop of the last two axes of ``x`` (fastMRI's rounding for odd margins)."""
    h, w = x.shape[-2:]
    if shape[0] > h or shape[1] > w:
        raise ValueError(f"crop {shape} is larger than the image {(h, w)}")
    top, left = (h - shape[0]) // 2, (w - shape[1]) // 2
    return x[..., top : top + shape[0], left : left + shape[1]]


def make_mask_func(mask_type: MaskType, center_fractions: Sequence[float], accelerations: Sequence[int]) -> MaskFunc:
    """fastMRI mask function (``"random"`` or ``"equispaced"``) for the given center fractions and accelerations."""
    if mask_type not in ("random", "equispaced"):
        raise ValueError(f"mask_type must be 'random' or 'equispaced', got {mask_type!r}")
    if len(center_fractions) != len(accelerations):
        raise ValueError(f"center_fractions {list(center_fractions)} and accelerations {list(accelerations)} "
                         "must have the same length")
    return create_mask_for_mask_type(mask_type, list(center_fractions), list(accelerations))


def undersample(kspace: np.ndarray, mask_func: MaskFunc, seed: int | tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Keep the phase-encode columns that ``mask_func`` selects for ``seed``.

    Args:
        kspace: ``[H, W]`` complex k-space (W: phase-encode columns).
        mask_func: from :func:`make_mask_func`.
        seed: integer or tuple of integers; the mask is a deterministic function of it.

    Returns:
        ``(masked_kspace [H, W] complex64, mask [W] bool)``.
    """
    mask, _ = mask_func((1, kspace.shape[-1], 1), seed=seed)  # fastMRI shape convention [..., W, 2]
    keep = mask.reshape(-1).numpy().astype(bool)
    return (kspace * keep).astype(np.complex64), keep


def zero_filled(kspace: np.ndarray, crop: tuple[int, int] = (320, 320)) -> np.ndarray:
    """Zero-filled reconstruction: ``|ifft2c(kspace)|`` center-cropped to ``crop`` -> ``[*crop]`` float32."""
    return np.abs(center_crop(ifft2c(kspace), crop)).astype(np.float32)

