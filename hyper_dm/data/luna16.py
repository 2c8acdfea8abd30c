"""LUNA16 CT in its distributed layout: ``subset0..9/<seriesuid>.mhd`` + ``.raw`` and ``annotations.csv``.

Volumes are read with SimpleITK (MetaImage, HU, LPS geometry: spacing, origin, direction). Axial slices are read
one at a time with SimpleITK's streamed region reading, as ``[x, y]`` arrays (MONAI's ITK axis order, the
transpose of SimpleITK's ``[y, x]`` array); ``annotations.csv`` coordinates are world (LPS) mm, as in the
challenge. Whole volumes for inference are read by MONAI's ``LoadImage`` (:mod:`hyper_dm.inference.loading`).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..io import safe_stem
from .validation import BadFileLog, BadInputError, check_finite

__all__ = [
    "Luna16Series", "case_entries", "find_series", "read_annotations", "read_axial_slice",
    "read_series_header",
]

_BYTES_PER_ELEMENT = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                      "MET_LONG": 8, "MET_ULONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}
_FLOAT_TYPES = ("MET_FLOAT", "MET_DOUBLE")


@dataclass(frozen=True)
class Luna16Series:
    """Header facts of one series. ``size``: ``(nx, ny, nz)`` voxels; ``spacing_mm``/``origin_mm``: LPS, x-y-z
    order; ``direction``: 3 x 3 direction cosines (columns = index axes)."""

    path: Path
    seriesuid: str
    size: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    direction: np.ndarray


def find_series(root: str | Path) -> list[Path]:
    """Sorted ``.mhd`` files under ``root/subset*/`` (or anywhere under ``root`` if there are no subset folders)."""
    root = Path(root)
    if not root.is_dir():
        raise BadInputError(root, "dataset directory does not exist; set data.dataset_dir to the LUNA16 root "
                                  "(holding subset0..9/) or to null for the synthetic set")
    paths = sorted(root.glob("subset*/*.mhd")) or sorted(root.rglob("*.mhd"))
    if not paths:
        raise BadInputError(root, "no LUNA16 series (*.mhd) found in subset*/ or below; is this the LUNA16 root?")
    return paths


def _mhd_fields(path: Path) -> dict[str, str]:
    fields = {}
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _local_data_bytes(path: Path) -> int:
    """Bytes after the header of a MetaImage whose data is in the same file (``ElementDataFile = LOCAL``)."""
    with path.open("rb") as f:
        for line in f:
            if line.split(b"=")[0].strip() == b"ElementDataFile":
                return path.stat().st_size - f.tell()
    return 0


def read_series_header(path: str | Path) -> Luna16Series:
    """Read and check one ``.mhd`` header and its ``.raw`` size; :class:`BadInputError` names what is wrong.

    Float volumes are read in full once to reject NaN/inf (integer volumes, as in LUNA16, cannot hold them).
    """
    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise BadInputError(path, "cannot parse the MetaImage header (ITK rejected it; check ObjectType, NDims, "
                                  "DimSize, ElementSpacing, ElementType and ElementDataFile)") from e
    if reader.GetDimension() != 3:
        raise BadInputError(path, f"expected a 3-D volume, header says NDims = {reader.GetDimension()}")
    size = tuple(int(v) for v in reader.GetSize())
    spacing = tuple(float(v) for v in reader.GetSpacing())
    if min(size) < 1 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise BadInputError(path, f"invalid DimSize {size} or ElementSpacing {spacing} (mm)")
    fields = _mhd_fields(path)
    raw = path.parent / fields.get("ElementDataFile", "")
    element = fields.get("ElementType", "")
    if fields.get("CompressedData", "False") == "False":
        local = fields.get("ElementDataFile", "LOCAL") == "LOCAL"
        if not local and not raw.is_file():
            raise BadInputError(path, f"data file {raw.name} named by ElementDataFile is missing")
        expected = int(np.prod(size)) * _BYTES_PER_ELEMENT.get(element, 0)
        actual = _local_data_bytes(path) if local else raw.stat().st_size
        raw = path if local else raw
        if expected and actual < expected:
            raise BadInputError(raw, f"has {actual} bytes but the header {path.name} needs {expected} "
                                     f"({size} x {element}); the file is truncated, copy it again")
        if expected and actual > expected:
            raise BadInputError(path, f"header says {size} x {element} = {expected} bytes but {raw.name} holds "
                                      f"{actual} ({actual / expected:.3g} x as many): DimSize or ElementType does not "
                                      "match the data")
    if element in _FLOAT_TYPES:
        try:
            volume = sitk.ReadImage(str(path))  # held by name: the array view borrows its buffer
            check_finite(sitk.GetArrayViewFromImage(volume), path, "the volume")
        except RuntimeError as e:
            raise BadInputError(path, f"cannot read the volume ({str(e)[:200]})") from e
    return Luna16Series(path=path, seriesuid=path.stem, size=size, spacing_mm=spacing,
                        origin_mm=tuple(float(v) for v in reader.GetOrigin()),
                        direction=np.asarray(reader.GetDirection(), dtype=np.float64).reshape(3, 3))


def read_axial_slice(path: str | Path, index: int) -> np.ndarray:
    """Axial slice ``index`` of the series in HU, ``[nx, ny]`` float32, read without loading the whole volume."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        nx, ny, nz = reader.GetSize()
        if not 0 <= index < nz:
            raise BadInputError(path, f"slice {index} out of range (the volume has {nz} slices)")
        reader.SetExtractIndex([0, 0, int(index)])
        reader.SetExtractSize([nx, ny, 1])
        hu = sitk.GetArrayFromImage(reader.Execute())[0].T.astype(np.float32)  # [y, x] -> [x, y]
    except RuntimeError as e:
        raise BadInputError(path, f"cannot read slice {index} ({str(e)[:200]})") from e
    check_finite(hu, path, f"slice {index}")
    return hu


def read_annotations(root: str | Path) -> dict[str, list[dict]]:
    """``annotations.csv`` under ``root`` (or the CSV file ``root`` itself) ->
    ``{seriesuid: [{"coord_mm": [x, y, z], "diameter_mm": d}, ...]}``.

    Missing file under a folder: no annotations (``{}``). Coordinates are world LPS mm, as in LUNA16. A value that
    is not a finite number (or a diameter <= 0) is a :class:`BadInputError` naming the line.
    """
    path = Path(root)
    path = path if path.is_file() else path / "annotations.csv"
    if not path.is_file():
        return {}
    out: dict[str, list[dict]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"} - set(reader.fieldnames or [])
        if missing:
            raise BadInputError(path, f"missing columns {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            try:
                coord = [float(row[k]) for k in ("coordX", "coordY", "coordZ")]
                diameter = float(row["diameter_mm"])
            except (TypeError, ValueError):
                raise BadInputError(path, f"line {line}: coordX/coordY/coordZ/diameter_mm must be numbers, got "
                                          f"{row}") from None
            if not np.isfinite([*coord, diameter]).all() or diameter <= 0:
                raise BadInputError(path, f"line {line}: coordinates must be finite and diameter_mm > 0, got {row}")
            out.setdefault(row["seriesuid"], []).append({"coord_mm": coord, "diameter_mm": diameter})
    return out


def case_entries(root: str | Path, img_size: int, bad: BadFileLog, paths: Sequence[Path] | None = None
                 ) -> list[dict]:
    """One datalist entry per readable series of ``paths`` (default: all under ``root``); bad ones raise or are
    skipped by ``bad``.

    Entry: ``{"image", "case_id", "patient_id", "n_slices",
    "pixel_mm" (in-plane pixel size of the resized grid), "nodules"}``.
    """
    annotations = read_annotations(root)
    entries = []
    for path in find_series(root) if paths is None else paths:
        try:
            if not path.is_file():
                raise BadInputError(path, "listed in the datalist but missing")
            series = read_series_header(path)
        except BadInputError as e:
            bad.handle(e)
            continue
        entries.append({
            "image": str(path), "case_id": safe_stem(series.seriesuid), "patient_id": series.seriesuid,
            "n_slices": series.size[2],
            "pixel_mm": float(np.mean(np.asarray(series.spacing_mm[:2]) * np.asarray(series.size[:2]) / img_size)),
            "nodules": annotations.get(series.seriesuid, []),
        })
    return entries
