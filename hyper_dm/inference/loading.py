"""Load one case for volume inference: MONAI readers, MetaTensor geometry, the measurement simulated or as measured.

Input modes (:class:`InputMode`):

- ``simulate`` (benchmark): the file is a full-dose CT volume (HU) or a fully sampled fastMRI file; the
  sparse-view FBP / zero-filled condition (MRI: after ``kspace_noise``) is simulated with the configured physics
  (seeded per case, as the validation split is), and the file itself is the reference (``label``).
- ``measured``: CT: the file *is* the sparse-view FBP volume (HU); MRI: a challenge-style ``.h5`` whose ``kspace``
  is already undersampled and which carries its ``mask``; the condition is taken as it is, there is no reference
  (unless an MRI file also holds ``reconstruction_esc``).

A loaded case (:func:`load_case`) is a dict::

    case_id   str                       output stem
    image     str                       source path
    volume    MetaTensor [1, X, Y, Z]   source grid and geometry (oriented LPS for CT, as LUNA16 is stored), the
                                        grid the outputs are written on
    cond      Tensor [1, x, y, Z]       condition in physical units (HU / magnitude); in-plane size x, y may be the
                                        model grid already (simulated CT)
    label     Tensor [1, X, Y, Z] | None  reference in physical units
    gain, offset  Tensor [Z]            physical = gain * model + offset per slice (see data.intensity)
    kspace    ndarray [Z, H, W] complex64  MRI only: the measured (undersampled) k-space, zero off the mask
    kspace_mask  ndarray [W] bool       MRI only: the sampled columns
    scale_ratio  Tensor [Z] | None      MRI only: the magnitude scale over the one the zero-filled condition alone
                                        gives (:func:`zero_filled_scales`); ``None`` where the scale *is* that one (a
                                        measured file without a ``max`` attribute: see
                                        :func:`~hyper_dm.inference.scale_like_calibration`)

CT volumes are read by MONAI's ``LoadImage`` (ITK for ``.mhd`` and DICOM folders, nibabel for NIfTI) and
reoriented to LPS with ``Orientation`` so slices look like the LUNA16 slices the model trained on;
:func:`to_source_layout` undoes it for writing.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from enum import Enum
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.data import ITKReader, MetaTensor, NibabelReader
from monai.transforms import GaussianSmooth, LoadImage, Orientation

from ..config import parse_choice
from ..data import fastmri_knee
from ..data.intensity import physical_map
from ..data.transforms import stable_seed
from ..data.validation import BadInputError
from ..physics.ct import ParallelBeamCT, hu_to_mu, mu_to_hu
from .inputs import is_dicom_folder

__all__ = ["InputMode", "MIN_INPLANE", "SCALE_SMOOTHING_PX", "load_case", "to_source_layout", "zero_filled_scales"]

logger = logging.getLogger(__name__)

MIN_INPLANE = 16
"""Smallest in-plane size (pixels) a volume may have."""
SCALE_SMOOTHING_PX = 2.0
"""Std (pixels of the 320 x 320 grid) of the Gaussian a zero-filled MRI volume is smoothed by for its scale."""
_TO_LPS = Orientation(axcodes="LPS", labels=None)  # one instance: MONAI inverts only the instance that applied it


class InputMode(str, Enum):
    """How the file relates to the measurement: ``simulate`` degrades it, ``measured`` takes it as measured."""

    SIMULATE = "simulate"
    MEASURED = "measured"

    @classmethod
    def parse(cls, value: str) -> InputMode:
        return parse_choice(cls, value, "inference_cfg#input_mode")


def _read_ct(path: Path) -> MetaTensor:
    """``[1, X, Y, Z]`` HU MetaTensor (RAS affine in its meta) oriented LPS."""
    if path.is_dir():
        if not is_dicom_folder(path):
            raise BadInputError(path, "folder holds no DICOM files (expected one DICOM series)")
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        if len(series) != 1:
            raise BadInputError(path, f"folder holds {len(series)} DICOM series ({', '.join(series[:4])}); put each "
                                      "series in its own folder")
    elif not path.is_file():
        raise BadInputError(path, "file does not exist")
    reader = NibabelReader() if path.name.lower().endswith((".nii", ".nii.gz")) else ITKReader()
    try:
        volume = LoadImage(reader=reader, image_only=True, ensure_channel_first=True, dtype=np.float32)(str(path))
    except Exception as e:  # readers raise many types (RuntimeError, OSError, ValueError) for unreadable files
        raise BadInputError(path, f"cannot be read as an image volume ({type(e).__name__}: {str(e)[:300]})") from e
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise BadInputError(path, f"expected one 3-D volume, got array shape {tuple(volume.shape)} (with the "
                                  "channel first); 2-D images and 4-D series are not supported")
    volume = _TO_LPS(volume)
    if min(volume.shape[1:3]) < MIN_INPLANE:
        raise BadInputError(path, f"in-plane size {tuple(volume.shape[1:3])} after orienting to axial slices is "
                                  f"below {MIN_INPLANE} pixels; is this an axial CT volume?")
    if not torch.isfinite(volume).all():
        raise BadInputError(path, "the volume contains NaN/infinite values")
    return volume


def _check_ct_acquisition(entry: Mapping, data: Mapping) -> None:
    """Compare the acquisition a datalist entry states (``n_views``, ``noise``, ``i0``) with the model's."""
    stated = {k: entry[k] for k in ("n_views", "noise", "i0") if k in entry}
    if not stated:
        logger.info("%s: acquisition not stated; assuming the model's (n_views=%s, noise=%s, i0=%s)",
                    entry["image"], data["n_views"], data["noise"], data["i0"])
        return
    if "n_views" in stated and int(stated["n_views"]) != int(data["n_views"]):
        raise BadInputError(entry["image"], f"states n_views={stated['n_views']} but the model was trained for "
                                            f"data#n_views={data['n_views']}; use a model trained for that many views")
    for key in ("noise", "i0"):
        if key in stated and str(stated[key]) != str(data[key]) and not (
                key == "i0" and float(stated[key]) == float(data[key])):
            logger.warning("%s: states %s=%s but the model was trained with %s; its AU may not match this noise",
                           entry["image"], key, stated[key], data[key])


def _simulate_ct(hu: torch.Tensor, data: Mapping, img_size: int, pixel_mm: float, case_id: str) -> torch.Tensor:
    """Sparse-view FBP ``[1, S, S, Z]`` HU of each axial slice of ``hu [1, X, Y, Z]`` on an S x S grid of
    ``pixel_mm`` pixels (the model grid, or the source's own with ``fbp_pitch: source``)."""
    ct = ParallelBeamCT(n_views=int(data["n_views"]), noise=data["noise"], i0=float(data["i0"]),
                        sigma=float(data["sigma"]))
    slices = F.interpolate(hu[0].permute(2, 0, 1)[:, None], size=(img_size, img_size), mode="area")[:, 0]
    out = torch.empty(1, img_size, img_size, hu.shape[-1])
    for k, image in enumerate(slices.double().numpy()):
        sino = ct.project(hu_to_mu(image), pixel_mm)
        rng = np.random.default_rng(stable_seed(data["split_seed"], case_id, k))
        out[0, ..., k] = torch.from_numpy(mu_to_hu(ct.fbp(ct.add_noise(sino, rng), pixel_mm, img_size)))
    return out


def _load_ct(entry: Mapping, data: Mapping, mode: InputMode, img_size: int) -> dict:
    path = Path(entry["image"])
    volume = _read_ct(path)
    lo, hi = data["hu_window"]
    z = volume.shape[-1]
    gain, offset = physical_map("ct", data["hu_window"])
    case = {"volume": volume, "gain": torch.full((z,), gain), "offset": torch.full((z,), offset)}
    if mode is InputMode.MEASURED:
        _check_ct_acquisition(entry, data)
        case.update(cond=volume.as_tensor().clamp(lo, hi), label=None)
    else:
        grid = max(volume.shape[1:3]) if data["fbp_pitch"] == "source" else img_size  # the FBP's own grid
        pixel_mm = float(np.mean(np.asarray(volume.pixdim[:2]) * np.asarray(volume.shape[1:3]) / grid))
        label = volume.as_tensor().clamp(lo, hi)
        case.update(cond=_simulate_ct(label, data, grid, pixel_mm, entry["case_id"]).clamp(lo, hi), label=label)
    return case


def _load_mri(entry: Mapping, data: Mapping, mode: InputMode) -> dict:
    from ..physics.mri import add_kspace_noise, make_mask_func, undersample, zero_filled  # the optional [mri] extra

    path = Path(entry["image"])
    if not path.is_file():
        raise BadInputError(path, "file does not exist")
    knee = fastmri_knee.read_volume(path)
    if mode is InputMode.MEASURED:
        if knee.mask is None:
            raise BadInputError(path, "has no 'mask' dataset: measured mode needs challenge-style undersampled "
                                      "k-space with its mask; for fully sampled files use input_mode simulate")
        unsampled = ~knee.mask
        if np.abs(knee.kspace[..., unsampled]).max(initial=0.0) > 0:
            logger.warning("%s: kspace has non-zero columns where 'mask' is 0; zeroing them as the mask says", path)
        kspace, kspace_mask = (knee.kspace * knee.mask).astype(np.complex64), knee.mask
        cond = zero_filled(kspace, fastmri_knee.RECON_SHAPE)
    elif knee.mask is not None or knee.reconstruction is None:
        raise BadInputError(path, "is already undersampled (has 'mask') or has no 'reconstruction_esc': use "
                                  "input_mode measured for challenge-style files")
    label = knee.reconstruction
    scales = None if label is None else _magnitude_scales(label, data["mri_norm"])  # simulate: always a label
    if knee.max is not None and data["mri_norm"] == "volume_max":
        scales = np.full(len(knee.kspace), knee.max if knee.max > 0 else 1.0)
    if mode is InputMode.SIMULATE:  # the configured measurement: k-space noise, then one mask per file
        mask_func = make_mask_func(data["mask_type"], data["center_fractions"], data["accelerations"])
        seed = stable_seed(data["split_seed"], entry["case_id"])
        noisy = (add_kspace_noise(k, float(data["kspace_noise"]) * scale, np.random.default_rng((seed, z)))
                 for z, (k, scale) in enumerate(zip(knee.kspace, scales, strict=True)))
        sampled = [undersample(k, mask_func, seed) for k in noisy]
        kspace, kspace_mask = np.stack([k for k, _ in sampled]), sampled[0][1]
        cond = zero_filled(kspace, fastmri_knee.RECON_SHAPE)
    estimated = zero_filled_scales(cond, data["mri_norm"])
    ratio = None if scales is None else torch.from_numpy(scales / estimated)
    gains = [physical_map("mri", data["hu_window"], float(s)) for s in (estimated if scales is None else scales)]
    affine = fastmri_knee.ras_affine(knee.fov_mm, fastmri_knee.RECON_SHAPE[0], len(cond))
    to_volume = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(1, 2, 0)))[None]  # noqa: E731
    return {
        "volume": MetaTensor(to_volume(cond if label is None else label), affine=torch.as_tensor(affine)),
        "cond": to_volume(cond),
        "label": None if label is None else to_volume(label),
        "gain": torch.tensor([g for g, _ in gains], dtype=torch.float32),
        "offset": torch.tensor([o for _, o in gains], dtype=torch.float32),
        "kspace": kspace,
        "kspace_mask": kspace_mask,
        "scale_ratio": ratio,
    }


def _magnitude_scales(images: np.ndarray, norm: str) -> np.ndarray:
    """The magnitude scale of each slice of ``images [Z, H, W]``: ``[Z]`` float64, the volume's max
    (``volume_max``) or each slice's (``slice_max``); 1 where that max is 0."""
    peaks = images.reshape(len(images), -1).max(axis=1).astype(np.float64)
    scales = np.full(len(images), peaks.max()) if norm == "volume_max" else peaks
    return np.where(scales > 0, scales, 1.0)


def zero_filled_scales(cond: np.ndarray, norm: str) -> np.ndarray:
    """The magnitude scale a zero-filled ``cond [Z, H, W]`` alone gives (``[Z]``, see :func:`_magnitude_scales`),
    taken after a Gaussian of :data:`SCALE_SMOOTHING_PX` so that k-space noise does not set the peak (on the
    synthetic knees the fully sampled max over it varies 3% with the noise from none to 0.3 of the scale; over the
    plain zero-filled max, 36%)."""
    return _magnitude_scales(GaussianSmooth(SCALE_SMOOTHING_PX)(np.ascontiguousarray(cond, np.float32)).numpy(),
                             norm)


def load_case(entry: Mapping, data: Mapping, mode: InputMode | str, img_size: int) -> dict:
    """Load the case ``entry`` (``image``, ``case_id``) for the resolved ``data`` section (see module docstring).

    Raises :class:`BadInputError` naming the file for anything that cannot be reconstructed.
    """
    mode = InputMode.parse(mode) if isinstance(mode, str) else mode
    load = _load_ct(entry, data, mode, img_size) if data["task"] == "ct" else _load_mri(entry, data, mode)
    return {"case_id": entry["case_id"], "image": str(entry["image"]), **load}


def to_source_layout(array: torch.Tensor, volume: MetaTensor) -> MetaTensor:
    """``array [C, X, Y, Z]`` on ``volume``'s (oriented) grid -> MetaTensor in the file's own voxel layout."""
    out = MetaTensor(array, meta=copy.deepcopy(volume.meta),
                     applied_operations=copy.deepcopy(volume.applied_operations))
    return _TO_LPS.inverse(out) if out.applied_operations else out
