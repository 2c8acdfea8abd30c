"""fastMRI knee single-coil ``.h5`` files: ``kspace`` ``[slices, 640, W]`` complex64, ``reconstruction_esc``
``[slices, 320, 320]`` float32, attrs ``acquisition``/``max``/``norm``/``patient_id`` and ``ismrmrd_header`` XML.

fastMRI files carry no patient position, so :func:`ras_affine` is a spacing-only affine (pixel size from the
header's ``reconSpace`` field of view, slice spacing from its z extent) centred on the world origin. Cases are
files; the split groups files by ``patient_id``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..io import safe_stem
from .validation import BadFileLog, BadInputError, check_finite, check_kspace

__all__ = ["KneeFile", "KneeVolume", "case_entries", "find_files", "ras_affine", "read_file_header", "read_slice",
           "read_volume"]

_NS = {"m": "http://www.ismrm.org/ISMRMRD"}
RECON_SHAPE = (320, 320)


@dataclass(frozen=True)
class KneeFile:
    """Header facts of one file. ``fov_mm``: reconSpace field of view ``(x, y, z)`` in mm; ``max``: attrs max."""

    path: Path
    n_slices: int
    patient_id: str
    max: float
    fov_mm: tuple[float, float, float]


def find_files(root: str | Path) -> list[Path]:
    """Sorted ``*.h5`` files under ``root`` (recursively)."""
    root = Path(root)
    if not root.is_dir():
        raise BadInputError(root, "dataset directory does not exist; set data.dataset_dir to a folder of fastMRI "
                                  "knee single-coil .h5 files or to null for the synthetic set")
    paths = sorted(root.rglob("*.h5"))
    if not paths:
        raise BadInputError(root, "no fastMRI .h5 files found below this folder")
    return paths


def _recon_fov_mm(path: Path, header: bytes) -> tuple[float, float, float]:
    try:
        fov = ET.fromstring(header).find("m:encoding/m:reconSpace/m:fieldOfView_mm", _NS)
        return tuple(float(fov.find(f"m:{a}", _NS).text) for a in "xyz")
    except (ET.ParseError, AttributeError, TypeError, ValueError) as e:
        raise BadInputError(path, f"ismrmrd_header has no readable encoding/reconSpace/fieldOfView_mm ({e})") from e


def _open(path: Path, required: tuple[str, ...]) -> h5py.File:
    """Open a single-coil file for reading; :class:`BadInputError` unless it is HDF5 with the ``required`` datasets
    and a complex ``kspace [slices, 640, W >= 320]``."""
    try:
        hf = h5py.File(path, "r")
    except OSError as e:
        raise BadInputError(path, f"not a readable HDF5 file ({e})") from e
    missing = [name for name in required if name not in hf]
    kspace = hf.get("kspace")
    problem = None
    if missing:
        problem = f"missing dataset(s) {missing} (has {sorted(hf.keys())}); is this a fastMRI single-coil file?"
    elif kspace.ndim != 3 or not np.issubdtype(kspace.dtype, np.complexfloating) \
            or kspace.shape[1] < RECON_SHAPE[0] or kspace.shape[2] < RECON_SHAPE[1]:
        problem = (f"kspace has shape {kspace.shape} dtype {kspace.dtype}; expected complex [slices, 640, W] with "
                   "W >= 320 (single-coil)")
    if problem:
        hf.close()
        raise BadInputError(path, problem)
    return hf


def read_file_header(path: str | Path) -> KneeFile:
    """Open and check one file (datasets, shapes, dtypes, attrs, header; ``reconstruction_esc`` finite)."""
    path = Path(path)
    with _open(path, ("kspace", "reconstruction_esc", "ismrmrd_header")) as hf:
        kspace, esc = hf["kspace"], hf["reconstruction_esc"]
        if esc.shape != (kspace.shape[0], *RECON_SHAPE):
            raise BadInputError(path, f"reconstruction_esc has shape {esc.shape}; expected "
                                      f"{(kspace.shape[0], *RECON_SHAPE)} to match kspace")
        check_finite(esc[()], path, "reconstruction_esc")
        vmax = float(hf.attrs.get("max", np.nan))
        if not np.isfinite(vmax) or vmax <= 0:
            raise BadInputError(path, f"attribute 'max' is missing or not positive ({hf.attrs.get('max')})")
        fov = _recon_fov_mm(path, hf["ismrmrd_header"][()])
        return KneeFile(path=path, n_slices=int(kspace.shape[0]), max=vmax, fov_mm=fov,
                        patient_id=str(hf.attrs.get("patient_id", path.stem)))


def read_slice(path: str | Path, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Slice ``index``: ``(kspace [640, W] complex64, reconstruction_esc [320, 320] float32)``."""
    with h5py.File(path, "r") as hf:
        if not 0 <= index < hf["kspace"].shape[0]:
            raise BadInputError(path, f"slice {index} out of range (the file has {hf['kspace'].shape[0]} slices)")
        kspace = hf["kspace"][index].astype(np.complex64)
        target = hf["reconstruction_esc"][index].astype(np.float32)
    check_kspace(kspace, path, f"kspace slice {index}")
    return kspace, target


def ras_affine(fov_mm: tuple[float, float, float], img_size: int, n_slices: int) -> np.ndarray:
    """Spacing-only RAS affine ``[4, 4]`` of the ``[S, S, n_slices]`` volume, centred on the world origin."""
    spacing = np.array([fov_mm[0] / img_size, fov_mm[1] / img_size, fov_mm[2]])
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -spacing * (np.array([img_size, img_size, n_slices]) - 1) / 2
    return affine


def case_entries(root: str | Path, img_size: int, bad: BadFileLog, paths: Sequence[Path] | None = None
                 ) -> list[dict]:
    """One datalist entry per readable file of ``paths`` (default: all under ``root``): ``{"image", "case_id",
    "patient_id", "n_slices", "scale_max"}`` (``scale_max``: the file's attrs ``max``)."""
    entries = []
    for path in find_files(root) if paths is None else paths:
        try:
            if not path.is_file():
                raise BadInputError(path, "listed in the datalist but missing")
            info = read_file_header(path)
        except BadInputError as e:
            bad.handle(e)
            continue
        entries.append({
            "image": str(path), "case_id": safe_stem(path.stem),
            "patient_id": info.patient_id, "n_slices": info.n_slices,
            "scale_max": info.max,
        })
    return entries


@dataclass(frozen=True)
class KneeVolume:
    """A whole file for volume inference: ``kspace [Z, 640, W]`` complex64, ``mask [W]`` bool (measured files,
    else ``None``), ``reconstruction_esc [Z, 320, 320]`` float32 or ``None``, attrs ``max`` (or ``None``),
    reconSpace ``fov_mm``."""

    path: Path
    kspace: np.ndarray
    mask: np.ndarray | None
    reconstruction: np.ndarray | None
    max: float | None
    fov_mm: tuple[float, float, float]


def read_volume(path: str | Path, max_bytes: int = 4 << 30) -> KneeVolume:
    """Read every slice of a fully sampled or challenge-style (undersampled, with ``mask``) single-coil file.

    Refuses (naming the file) a non-HDF5 file, missing or malformed ``kspace``, a ``mask`` whose length is not
    the k-space width, a volume above ``max_bytes``, and NaN/inf values.
    """
    path = Path(path)
    with _open(path, ("kspace", "ismrmrd_header")) as hf:
        kspace = hf["kspace"]
        if kspace.shape[0] < 1:
            raise BadInputError(path, f"kspace has shape {kspace.shape}: no slices")
        if kspace.size * 8 > max_bytes:
            raise BadInputError(path, f"kspace {kspace.shape} needs {kspace.size * 8 / 2**30:.1f} GiB, more than the "
                                      f"{max_bytes / 2**30:.1f} GiB allowed for one volume")
        data = kspace[()].astype(np.complex64)
        mask = None
        if "mask" in hf:
            mask = np.asarray(hf["mask"][()]).reshape(-1).astype(bool)
            if mask.shape[0] != data.shape[2]:
                raise BadInputError(path, f"mask has {mask.shape[0]} entries but kspace has {data.shape[2]} columns")
        esc = hf["reconstruction_esc"][()].astype(np.float32) if "reconstruction_esc" in hf else None
        if esc is not None and esc.shape != (data.shape[0], *RECON_SHAPE):
            raise BadInputError(path, f"reconstruction_esc has shape {esc.shape}; expected "
                                      f"{(data.shape[0], *RECON_SHAPE)} to match kspace")
        vmax = float(hf.attrs["max"]) if "max" in hf.attrs else None
        fov = _recon_fov_mm(path, hf["ismrmrd_header"][()])
    check_kspace(data, path, "kspace")
    if esc is not None:
        check_finite(esc, path, "reconstruction_esc")
    return KneeVolume(path=path, kspace=data, mask=mask, reconstruction=esc, max=vmax, fov_mm=fov)
