"""MONAI dictionary transforms from a per-slice datalist item to a training sample, and the chains per task.

Per-slice item (see :func:`hyper_dm.data.datasets.slice_entries`): ``image`` (path), ``case_id``,
``slice_index``, ``n_slices``, ``seed`` (int), plus ``pixel_mm`` (CT) or ``scale_max``
(MRI). Chains (:func:`ct_transforms`, :func:`mri_transforms`)::

    CT : LoadLuna16Sliced (HU clipped to the window) -> Resized(target) -> ScaleIntensityRanged(target)
         -> CTSinogramd -> [Rand]CTMeasurementd -> ScaleIntensityRanged(cond)
         (``fbp_pitch: source``: ScaleIntensityRanged(target) -> CTSinogramd on the source grid -> Resized(target)
         -> [Rand]CTMeasurementd, whose FBP on the source grid is clipped and area-averaged to S x S)
    MRI: LoadFastMRISliced -> Resized(target) -> ScaleMagnituded(target) -> [Rand]MRIUndersampled
         -> Resized(cond) -> ScaleMagnituded(cond)

Resizing (area averaging) comes before the linear intensity scaling, so the scaling runs on S x S images.

Training uses the ``Rand*`` physics (new noise / new mask each time, drawn from the transform's ``R``, which
``monai.data.DataLoader`` seeds when it is built, and per worker and pass when it has workers; a training checkpoint
keeps it, see :class:`hyper_dm.engines.RNGState`); validation/test use the deterministic ones, seeded by the
item's ``seed`` (CT: per slice; MRI: per file, so one mask per file). MONAI's cached datasets cache everything
before the first random transform: the sinogram (CT) or the k-space slice (MRI) for training, the whole sample
for validation/test.
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    Randomizable,
    Resized,
    ScaleIntensityRanged,
    Transform,
)

from ..physics.ct import ParallelBeamCT, hu_to_mu, mu_to_hu
from . import fastmri_knee, luna16
from .intensity import from_magnitude, physical_map, to_hu

__all__ = [
    "CTMeasurementd", "CTSinogramd", "IntensityMapd", "LoadFastMRISliced", "LoadLuna16Sliced", "MRIUndersampled",
    "RandCTMeasurementd", "RandMRIUndersampled", "ScaleMagnituded", "ct_transforms", "mri_transforms",
    "stable_seed",
]


def stable_seed(*parts: object) -> int:
    """A 31-bit seed that depends only on ``parts`` (stable across processes, unlike ``hash``)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


class LoadLuna16Sliced(MapTransform):
    """Read axial slice ``slice_index`` of the series at ``d["image"]``: ``target`` ``[1, nx, ny]`` float32 HU
    clipped to ``hu_window`` (before any resampling, so the -2000/-3024 HU padding never bleeds into the image).
    """

    def __init__(self, hu_window: Sequence[float], image_key: str = "image") -> None:
        super().__init__(keys=[image_key])
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        hu = luna16.read_axial_slice(d[self.keys[0]], int(d["slice_index"]))
        d["target"] = torch.from_numpy(np.clip(hu, *self.hu_window))[None]
        return d


class LoadFastMRISliced(MapTransform):
    """Read slice ``slice_index`` of the file at ``d["image"]``.

    Writes ``kspace`` ``[640, W]`` complex64, ``target`` ``[1, 320, 320]`` float32 magnitude and ``scale`` (float):
    the file's ``max`` attribute (``mri_norm="volume_max"``) or the slice maximum (``"slice_max"``).
    """

    def __init__(self, mri_norm: str = "volume_max", image_key: str = "image") -> None:
        super().__init__(keys=[image_key])
        if mri_norm not in ("volume_max", "slice_max"):
            raise ValueError(f"mri_norm must be 'volume_max' or 'slice_max', got {mri_norm!r}")
        self.mri_norm = mri_norm

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        kspace, target = fastmri_knee.read_slice(d[self.keys[0]], int(d["slice_index"]))
        d["kspace"] = torch.from_numpy(kspace)
        d["target"] = torch.from_numpy(target)[None]
        slice_max = float(target.max())
        scale_max = float(d.pop("scale_max"))
        d["scale"] = scale_max if self.mri_norm == "volume_max" else (slice_max if slice_max > 0 else 1.0)
        return d


class ScaleMagnituded(MapTransform):
    """MRI magnitude -> model range with the sample's ``scale``: ``2 m / scale - 1`` clipped to [-1, 1]."""

    def __init__(self, keys: Sequence[str], scale_key: str = "scale") -> None:
        super().__init__(keys=keys)
        self.scale_key = scale_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = from_magnitude(torch.as_tensor(d[key], dtype=torch.float32), float(d[self.scale_key]))
        return d


class CTSinogramd(MapTransform):
    """Noise-free sinogram ``sino`` ``[n_det, n_views]`` of ``target`` ``[1, n, n]`` (model range -> HU -> mu), and
    the grid it was taken on: ``sino_grid`` (n) and ``sino_pitch_mm``.

    The pixel size comes from the item's ``pixel_mm`` (mm, the ``img_size`` grid), scaled to the target's own grid.
    """

    def __init__(self, ct: ParallelBeamCT, hu_window: Sequence[float], img_size: int, key: str = "target") -> None:
        super().__init__(keys=[key])
        self.ct, self.img_size = ct, img_size
        self.hu_window = tuple(float(v) for v in hu_window)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image = torch.as_tensor(d[self.keys[0]]).numpy()[0]
        if image.shape[0] != image.shape[1]:
            raise ValueError(f"{d.get('image')}: CT slices must be square to project, got {image.shape}")
        pitch = float(d["pixel_mm"]) * self.img_size / image.shape[0]
        mu = hu_to_mu(to_hu(image.astype(np.float64), self.hu_window))
        d["sino"] = torch.from_numpy(self.ct.project(mu, pitch))
        d["sino_grid"], d["sino_pitch_mm"] = image.shape[0], pitch
        return d


class CTMeasurementd(MapTransform):
    """Noisy measurement of ``sino`` and its FBP on the sinogram's grid: ``cond`` ``[1, S, S]`` float32 in HU,
    clipped to ``hu_window`` and area-averaged to S x S when the grid is finer (a scanner's FBP as inference reads
    it); ``sino`` and its grid keys are removed.

    Deterministic: the noise is drawn from ``np.random.default_rng(d["seed"])``.
    """

    def __init__(self, ct: ParallelBeamCT, img_size: int, hu_window: Sequence[float]) -> None:
        super().__init__(keys=["sino"])
        self.ct = ct
        self.img_size = img_size
        self.hu_window = tuple(float(v) for v in hu_window)

    def _rng(self, d: Mapping) -> np.random.Generator | np.random.RandomState:
        return np.random.default_rng(int(d["seed"]))

    def _i0(self) -> float | None:
        return None  # the configured photon count

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        sino, grid, pitch = d.pop("sino").numpy(), int(d.pop("sino_grid")), float(d.pop("sino_pitch_mm"))
        noisy = self.ct.add_noise(sino, self._rng(d), self._i0())
        fbp = torch.from_numpy(mu_to_hu(self.ct.fbp(noisy, pitch, grid)).astype(np.float32))[None]
        if grid != self.img_size:
            fbp = F.interpolate(fbp.clamp(*self.hu_window)[None], size=(self.img_size,) * 2, mode="area")[0]
        d["cond"] = fbp
        return d


class RandCTMeasurementd(Randomizable, CTMeasurementd):
    """:class:`CTMeasurementd` with fresh noise from the transform's random state on every call (training); with
    ``i0_range = (low, high)`` the photon count of each call is drawn log-uniformly in it."""

    def __init__(self, ct: ParallelBeamCT, img_size: int, hu_window: Sequence[float],
                 i0_range: Sequence[float] | None = None) -> None:
        super().__init__(ct, img_size, hu_window)
        self.i0_range = None if i0_range is None else tuple(float(v) for v in i0_range)
        self.i0: float | None = None

    def randomize(self, data: object = None) -> None:
        """Draw this call's photon count (the noise itself is drawn from ``self.R`` directly)."""
        if self.i0_range is not None:
            self.i0 = float(np.exp(self.R.uniform(*np.log(self.i0_range))))

    def _rng(self, d: Mapping) -> np.random.RandomState:
        return self.R

    def _i0(self) -> float | None:
        return self.i0

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        self.randomize()
        return super().__call__(data)


class MRIUndersampled(MapTransform):
    """Add k-space noise, undersample ``kspace`` with a fastMRI mask and reconstruct zero-filled: ``cond``
    ``[1, 320, 320]`` magnitude.

    Deterministic: the mask seed is the item's ``seed`` (per file, so all slices of a file share one mask) and the
    noise is seeded by it and ``slice_index``; its std is ``kspace_noise`` times the sample's ``scale``.
    ``kspace`` is removed.
    """

    def __init__(self, mask_type: str, center_fractions: Sequence[float], accelerations: Sequence[int],
                 kspace_noise: float = 0.0) -> None:
        from ..physics.mri import make_mask_func  # fastMRI is the optional [mri] extra

        super().__init__(keys=["kspace"])
        self.mask_func = make_mask_func(mask_type, center_fractions, accelerations)
        self.kspace_noise = float(kspace_noise)

    def _draw(self, d: Mapping) -> tuple[int, float, np.random.Generator]:
        """Mask seed, relative noise std and the noise generator for this sample."""
        return int(d["seed"]), self.kspace_noise, np.random.default_rng((int(d["seed"]), int(d["slice_index"])))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        from ..physics.mri import add_kspace_noise, undersample, zero_filled

        d = dict(data)
        seed, noise, rng = self._draw(d)
        kspace = add_kspace_noise(d.pop("kspace").numpy(), noise * float(d["scale"]), rng)
        masked, _ = undersample(kspace, self.mask_func, seed=seed)
        d["cond"] = torch.from_numpy(zero_filled(masked, fastmri_knee.RECON_SHAPE))[None]
        return d


class RandMRIUndersampled(Randomizable, MRIUndersampled):
    """:class:`MRIUndersampled` with a new mask and new noise on every call (training); with ``noise_range``
    the relative noise std is drawn uniformly in it per call."""

    def __init__(self, mask_type: str, center_fractions: Sequence[float], accelerations: Sequence[int],
                 kspace_noise: float = 0.0, noise_range: Sequence[float] | None = None) -> None:
        super().__init__(mask_type, center_fractions, accelerations, kspace_noise)
        self.noise_range = None if noise_range is None else tuple(float(v) for v in noise_range)

    def randomize(self, data: object = None) -> None:
        """Nothing to pre-draw: everything is drawn from ``self.R`` in :meth:`_draw`."""

    def _draw(self, d: Mapping) -> tuple[int, float, np.random.Generator]:
        noise = self.kspace_noise if self.noise_range is None else float(self.R.uniform(*self.noise_range))
        return int(self.R.randint(0, 2**31 - 1)), noise, np.random.default_rng(int(self.R.randint(0, 2**31 - 1)))


class IntensityMapd(Transform):
    """Add ``intensity_scale``/``intensity_offset`` (floats): ``physical = scale * x + offset`` for this sample.

    CT: the HU window's half-width and centre; MRI: half the sample's magnitude ``scale`` (both).
    """

    def __init__(self, task: str, hu_window: Sequence[float]) -> None:
        self.task, self.hu_window = task, hu_window

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        d["intensity_scale"], d["intensity_offset"] = physical_map(self.task, self.hu_window, d.get("scale"))
        return d


def _plain_tensors() -> EnsureTyped:
    """``target``/``cond`` as plain float32 tensors (MONAI's resizing returns ``MetaTensor``)."""
    return EnsureTyped(keys=["target", "cond"], data_type="tensor", dtype=torch.float32, track_meta=False)


def ct_transforms(data: Mapping, train: bool) -> Compose:
    """CT chain for a resolved data config (``img_size``, ``hu_window``, ``n_views``, ``noise``, ``i0``, ``sigma``,
    ``fbp_pitch``)."""
    lo, hi = data["hu_window"]
    size = int(data["img_size"])
    ct = ParallelBeamCT(n_views=int(data["n_views"]), noise=data["noise"], i0=float(data["i0"]),
                        sigma=float(data["sigma"]))
    window = {"a_min": lo, "a_max": hi, "b_min": -1.0, "b_max": 1.0, "clip": True}
    resize = Resized(keys="target", spatial_size=(size, size), mode="area")
    project = [ScaleIntensityRanged(keys="target", **window), CTSinogramd(ct, (lo, hi), size)]
    return Compose([
        LoadLuna16Sliced(hu_window=(lo, hi)),
        *([*project, resize] if data["fbp_pitch"] == "source" else [resize, *project]),
        RandCTMeasurementd(ct, size, (lo, hi), data["i0_range"]) if train else CTMeasurementd(ct, size, (lo, hi)),
        ScaleIntensityRanged(keys="cond", **window),
        IntensityMapd("ct", (lo, hi)),
        _plain_tensors(),
    ])


def mri_transforms(data: Mapping, train: bool) -> Compose:
    """MRI chain for a resolved data config (``img_size``, ``mask_type``, ``center_fractions``, ``accelerations``,
    ``mri_norm``, ``kspace_noise``, ``kspace_noise_range``)."""
    size = int(data["img_size"])
    return Compose([
        LoadFastMRISliced(mri_norm=data["mri_norm"]),
        Resized(keys="target", spatial_size=(size, size), mode="area"),
        ScaleMagnituded(keys=["target"]),
        (RandMRIUndersampled(data["mask_type"], data["center_fractions"], data["accelerations"],
                             data["kspace_noise"], data["kspace_noise_range"]) if train else
         MRIUndersampled(data["mask_type"], data["center_fractions"], data["accelerations"], data["kspace_noise"])),
        Resized(keys="cond", spatial_size=(size, size), mode="area"),
        ScaleMagnituded(keys=["cond"]),
        IntensityMapd("mri", data["hu_window"]),
        _plain_tensors(),
    ])
