"""Single-coil Cartesian MRI: fastMRI's k-space convention, undersampling masks, zero-filled reconstruction.

k-space convention (fastMRI's ``fastmri.fft2c``/``ifft2c``): centered orthonormal 2-D DFT over the last two
axes, ``kspace = fftshift(fft2(ifftshift(image), norm="ortho"))``. Knee single-coil k-space is
``[640, 368]`` (readout x phase encode) with 2x readout oversampling; the reconstruction is the magnitude of
the inverse transform center-cropped to ``[320, 320]``.

Masks are fastMRI's own ``MaskFunc`` (``fastmri.data.subsample``): whole phase-encode columns (the last axis)
are kept; ``center_fractions`` of the columns around DC are always kept and the rest are drawn to reach the
acceleration. A mask is a pure function of ``seed``: the same seed gives the same mask, from any thread (a
``MaskFunc`` reseeds one shared ``RandomState`` per call, so :func:`undersample` holds a lock around it: otherwise
``CacheDataset``'s threads would draw each other's masks).

Measurement noise (:func:`add_kspace_noise`): white complex Gaussian noise on every k-space sample before the mask;
with the orthonormal DFT its per-component std is also the noise std of each complex image pixel.

Data consistency (:func:`data_consistent`): a magnitude estimate on the ``[320, 320]`` grid takes the phase of the
fully sampled centre columns, and its k-space moves towards the measured values on the sampled columns (all the way
where they are noise-free, as in the data-consistency step of fastMRI's unrolled networks).

Example::

    >>> mask_func = make_mask_func("random", [0.08], [4])
    >>> masked, mask = undersample(kspace, mask_func, seed=1234)     # kspace: [640, 368] complex64
    >>> cond = zero_filled(masked)                                   # [320, 320] float32 magnitude
    >>> recon = data_consistent(estimate[None], masked[None], mask)  # estimate: [320, 320] magnitude
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Literal

import numpy as np
from fastmri.data.subsample import MaskFunc, create_mask_for_mask_type

__all__ = ["MaskType", "add_kspace_noise", "center_crop", "centre_block", "data_consistent", "fft2c", "ifft2c",
           "make_mask_func", "undersample", "zero_filled"]

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


_MASK_LOCK = threading.Lock()


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
    with _MASK_LOCK:  # the MaskFunc's RandomState is reseeded and drawn from in two steps
        mask, _ = mask_func((1, kspace.shape[-1], 1), seed=seed)  # fastMRI shape convention [..., W, 2]
    keep = mask.reshape(-1).numpy().astype(bool)
    return (kspace * keep).astype(np.complex64), keep


def zero_filled(kspace: np.ndarray, crop: tuple[int, int] = (320, 320)) -> np.ndarray:
    """Zero-filled reconstruction: ``|ifft2c(kspace)|`` center-cropped to ``crop`` -> ``[*crop]`` float32."""
    return np.abs(center_crop(ifft2c(kspace), crop)).astype(np.float32)


def centre_block(mask: np.ndarray) -> np.ndarray:
    """The contiguous run of sampled columns around DC (column ``W // 2``) of ``mask [W]``: bool ``[W]``."""
    mask = np.asarray(mask, dtype=bool)
    centre = mask.shape[0] // 2
    block = np.zeros_like(mask)
    if not mask[centre]:
        return block
    left, right = centre, centre
    while left > 0 and mask[left - 1]:
        left -= 1
    while right < mask.shape[0] - 1 and mask[right + 1]:
        right += 1
    block[left : right + 1] = True
    return block


def data_consistent(magnitude: np.ndarray, kspace: np.ndarray, mask: np.ndarray, rings: int = 32,
                    noise: float | None = None) -> np.ndarray:
    """Move magnitude estimates towards the measured k-space columns, as far as the measurement noise allows.

    Args:
        magnitude: ``[Z, h, w]`` estimates on the center-cropped grid (e.g. ``[Z, 320, 320]``), or ``[Z, D, h, w]``:
            ``D`` estimates of each slice (e.g. diffusion draws).
        kspace: ``[Z, H, W]`` measured (undersampled) k-space, zero where not sampled.
        mask: ``[W]`` bool, the sampled columns; its fully sampled centre gives the phase.
        rings: rings of k-space radius over which the Wiener weight is estimated.
        noise: the measurement's noise power per sample (``2 sigma^2`` for noise of std ``sigma`` per real and
            imaginary part); ``None`` estimates it per slice, ``0`` replaces the sampled columns by the measurement.

    Each estimate takes the phase of the low-resolution image of the centre block and is placed in the middle of
    the ``[H, W]`` field of view (zero outside the crop). On sampled columns its k-space moves towards the
    measurement by the empirical Wiener weight ``max(1 - noise / P, 0)`` of its ring, where ``P`` is the ring's mean
    squared difference between measurement and estimate and ``noise`` the measurement's noise power (by default the
    median of ``|k|^2`` over the outer fifth of readout rows divided by ln 2, as complex Gaussian noise power is
    exponential). Noise-free data is thus taken as measured. Returns the magnitudes, center-cropped, shaped like
    ``magnitude`` (float32).
    """
    kspace, mask = np.asarray(kspace), np.asarray(mask, dtype=bool)
    if kspace.ndim != 3 or magnitude.ndim not in (3, 4) or magnitude.shape[0] != kspace.shape[0] \
            or mask.shape != kspace.shape[-1:]:
        raise ValueError(f"expected magnitude [Z, h, w] or [Z, D, h, w], kspace [Z, H, W] and mask [W], got "
                         f"{magnitude.shape}, {kspace.shape} and {mask.shape}")
    h, w = magnitude.shape[-2:]
    rows, cols = kspace.shape[-2:]
    estimates = magnitude.reshape(kspace.shape[0], -1, h, w)  # [Z, D, h, w]
    ky, kx = np.meshgrid(np.linspace(-1, 1, rows), np.linspace(-1, 1, cols)[mask], indexing="ij")
    ring = np.minimum((np.hypot(ky, kx) / np.sqrt(2) * rings).astype(int), rings - 1).ravel()
    counts = np.maximum(np.bincount(ring, minlength=rings), 1)
    outer = np.abs(np.arange(rows) - rows // 2) > 0.4 * rows
    centre = centre_block(mask)
    out = np.empty(estimates.shape, dtype=np.float32)
    for z in range(kspace.shape[0]):  # one slice at a time: the FFTs work in complex128
        phase = np.angle(center_crop(ifft2c(kspace[z] * centre), (h, w)))
        image = np.zeros((estimates.shape[1], rows, cols), dtype=np.complex64)
        center_crop(image, (h, w))[...] = estimates[z] * np.exp(1j * phase)  # a view: the middle of `image`
        estimate = fft2c(image)  # [D, H, W]
        measured = kspace[z][:, mask]
        power_noise = np.median(np.abs(measured[outer]) ** 2) / np.log(2) if noise is None else noise
        difference = measured - estimate[..., mask]  # [D, H, sampled columns]
        power = np.stack([np.bincount(ring, np.abs(d.ravel()) ** 2, minlength=rings) for d in difference]) / counts
        weight = np.clip(1 - power_noise / np.maximum(power, np.finfo(np.float64).tiny), 0, 1)  # [D, rings]
        estimate[..., mask] += weight[:, ring].reshape(difference.shape) * difference
        out[z] = zero_filled(estimate, (h, w))
    return out.reshape(magnitude.shape)
