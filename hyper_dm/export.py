"""Export for downstream nodule detection: HU volumes, their uncertainty volumes and a datalist that MONAI's
``lung_nodule_ct_detection`` bundle reads unchanged.

The export is the inference workflow (``inference.yaml``: :class:`~hyper_dm.inference.CaseDataset`,
:class:`~hyper_dm.inference.VolumeEvaluator`, :class:`~hyper_dm.engines.CaseWriter`) with three additions wired in
``export.yaml``: :class:`DetectionLayout` resamples each reconstructed case before it is written,
:class:`DetectionDatalist` checks the annotations before any work and writes the datalist at the end, and
:func:`run_export` runs both. Layout (``{case}``: the series' case id, for LUNA16 its ``seriesuid``)::

    {outdir}/{case}/{case}.nii.gz          posterior mean, HU, float32, RAS voxel order, export_cfg#pixdim spacing
    {outdir}/{case}/{case}_{eu,au,total}.nii.gz   the variances on the same grid (HU^2)
    {outdir}/{case}/{case}_unfamiliar.nii.gz  with a calibration that records an EU threshold: the uint8 mask of
                                           inference, resampled nearest
    {outdir}/{case}/{case}_preview.png     (and {case}_metrics.json for simulated input, as inference writes)
    {outdir}/datalist.json                 {"validation": [{"image": "{case}/{case}.nii.gz", "eu": ..., "au": ...,
                                           "total": ...}, ...]}, paths relative to outdir

The mean is named after the case (``{seriesuid}.nii.gz``), so tools that take the series uid from the image
file name (the LUNA16 evaluation scripts of MONAI's detection tutorial) work on the detector's output.

Grid and intensities are those of the detection bundle's resampled LUNA16 (``LUNA16_Images_resample``): the
reconstruction is oriented to RAS and resampled to ``export_cfg#pixdim`` (0.703125 x 0.703125 x 1.25 mm) with
MONAI's ``Orientation`` + ``Spacing`` (bilinear, border padding, as MONAI's ``luna16_prepare_images.py``),
intensities stay HU (clipped to ``data#hu_window`` by the model: air is -1000, not -1024). Variances are
resampled the same way (a convex combination: never negative) and ``total`` is recomputed as ``eu + au``.

Boxes (training export, ``export_cfg#annotations``): ``box`` is ``[x, y, z, d, d, d]`` per nodule, the
``cccwhd`` mode of :mod:`monai.data.box_utils` (centre, then width / height / depth) in world millimetres in the
ITK/LPS frame of LUNA16's ``annotations.csv`` (its ``coordX/Y/Z`` and ``diameter_mm`` unchanged); ``label`` is
``0`` per box (the bundle's single class). This is the frame the detection bundle expects: its transforms
``AffineBoxToImageCoordinated`` / ``AffineBoxToWorldCoordinated`` run with ``affine_lps_to_ras=True``, which
flips the RAS affine of the loaded image to LPS before mapping boxes, and its output boxes are in the same frame.

Example (Python; the bundle run id ``export`` does the same for a folder of series)::

    >>> out = HyperDM.from_bundle("bundle/models/model.pt").reconstruct("1.3.6...mhd", M=8, N=8)
    >>> layout = DetectionLayout(pixdim=(0.703125, 0.703125, 1.25))
    >>> mean_ras = layout.resample(out["mean"])      # [1, X', Y', Z'] HU, RAS, 0.703 x 0.703 x 1.25 mm
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, Spacing

from .config import ConfigError, parse_choice
from .data.config import resolve_data_config
from .data.luna16 import read_annotations
from .data.validation import BadInputError
from .engines.writer import MASKS, CaseWriter
from .inference.engine import VolumeEvaluator, input_entries, run_inference
from .io import atomic_write, output_path, safe_stem

__all__ = ["AbsentSeries", "DATALIST_NAME", "DetectionDatalist", "DetectionLayout", "UNCERTAINTY_KEYS",
           "nodule_box", "run_export", "series_world_frame"]

logger = logging.getLogger("hyper_dm.export")

DATALIST_NAME = "datalist.json"
UNCERTAINTY_KEYS = ("eu", "au", "total")
"""Keys of the uncertainty volumes in a datalist entry (paths relative to the export folder, like ``image``)."""
DATALIST_KEYS = ("training", "validation", "testing")
NODULE_CLASS = 0  # the detection bundle's only class (num_classes 1)


class AbsentSeries(str, Enum):
    """What to do with annotations of series that are not exported: ``error`` (default) or ``ignore`` them."""

    ERROR = "error"
    IGNORE = "ignore"

    @classmethod
    def parse(cls, value: str) -> AbsentSeries:
        return parse_choice(cls, value, "export_cfg#absent_series")


def annotations_of(path: str | Path, present: Callable[[str], bool], policy: AbsentSeries, section: str,
                   absent_means: str, fix: str) -> tuple[Path, dict[str, list]]:
    """LUNA16 annotations (``read_annotations``) from ``path`` (``annotations.csv`` or its folder) and the file read.

    Annotations of series for which ``present(seriesuid)`` is false are an error naming the file and the first
    series (``policy`` error; the message says they are ``absent_means`` and suggests ``fix`` or
    ``<section>#absent_series=ignore``) or are left out with a log line (``policy`` ignore).
    """
    path = Path(path)
    csv_path = path if path.suffix.lower() == ".csv" else path / "annotations.csv"
    if not csv_path.is_file():
        raise BadInputError(csv_path, f"annotations file does not exist ({section}#annotations: LUNA16's "
                                      "annotations.csv or the folder holding it)")
    nodules = read_annotations(csv_path)
    absent = sorted(uid for uid in nodules if not present(uid))
    if absent and policy is AbsentSeries.ERROR:
        names = ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
        raise BadInputError(csv_path, f"annotates {len(absent)} series {absent_means}: {names}; {fix}"
                                      f"{section}#absent_series=ignore to leave their annotations out")
    if absent:
        logger.info("annotations of %d series %s left out (absent_series=ignore)", len(absent), absent_means)
    return csv_path, {uid: found for uid, found in nodules.items() if present(uid)}


class DetectionLayout:
    """Resample reconstructed volumes to the detection bundle's grid: RAS voxel order, ``pixdim`` mm, values kept.

    Called on ``engine.state.output`` (the evaluator's ``postprocessing``): every MetaTensor in ``volumes``
    (``[1, X, Y, Z]``, the source geometry) is replaced by its resampled copy and ``total`` by ``eu + au``; outputs
    without ``volumes`` (skipped cases) pass unchanged.

    Args:
        pixdim: output voxel size in mm along the RAS axes (the bundle: ``[0.703125, 0.703125, 1.25]``).
        axcodes: output voxel order (RAS, as MONAI's LUNA16 preparation writes it).
        mode, padding_mode: interpolation of MONAI's ``Spacing`` (bilinear, border: no artificial edge values).
    """

    def __init__(self, pixdim: Sequence[float], axcodes: str = "RAS", mode: str = "bilinear",
                 padding_mode: str = "border") -> None:
        pixdim = [float(p) for p in pixdim]
        if len(pixdim) != 3 or not all(np.isfinite(pixdim)) or min(pixdim) <= 0:
            raise ConfigError(f"export_cfg#pixdim must be three voxel sizes > 0 in mm, got {pixdim}")
        self.pixdim = pixdim
        self.orientation = Orientation(axcodes=axcodes, labels=None)
        self.spacing = Spacing(pixdim=pixdim, mode=mode, padding_mode=padding_mode, dtype=torch.float32)

    def resample(self, volume: MetaTensor, mode: str | None = None) -> MetaTensor:
        """``volume [1, X, Y, Z]`` with its affine -> ``[1, X', Y', Z']`` float32 on the export grid (``mode``:
        the interpolation, default the layout's)."""
        image = MetaTensor(volume.as_tensor().float(), meta=dict(volume.meta))  # geometry only, no transform trace
        out = self.spacing(self.orientation(image), mode=mode)
        return MetaTensor(out.as_tensor().contiguous(), meta=dict(out.meta))

    def __call__(self, output: Mapping) -> Mapping:
        if not isinstance(output, Mapping) or output.get("volumes") is None:
            return output
        given = output["volumes"]
        exact_total = {"eu", "au", "total"} <= given.keys()
        volumes = {name: self.resample(image, "nearest" if name in MASKS else None) for name, image in given.items()
                   if name != "total" or not exact_total}
        if exact_total:  # the law of total variance stays exact on the new grid
            volumes["total"] = MetaTensor(volumes["eu"].as_tensor() + volumes["au"].as_tensor(),
                                          meta=dict(volumes["eu"].meta))
        return {**output, "volumes": volumes}


def nodule_box(coord_mm: Sequence[float], diameter_mm: float) -> list[float]:
    """A LUNA16 nodule (world LPS centre, diameter) as a ``cccwhd`` box: ``[x, y, z, d, d, d]`` mm."""
    return [float(c) for c in coord_mm] + [float(diameter_mm)] * 3


def series_world_frame(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(index_to_lps [4, 4], size [3])`` of a series (``.mhd``, NIfTI or a DICOM folder), from its header where
    the format allows it: world = ``index_to_lps @ [i, j, k, 1]`` in ITK/LPS mm."""
    path = Path(path)
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path)))
            image = reader.Execute()
            size, spacing, origin, direction = image.GetSize(), image.GetSpacing(), image.GetOrigin(), \
                image.GetDirection()
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            size, spacing, origin, direction = reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), \
                reader.GetDirection()
    except RuntimeError as e:
        raise BadInputError(path, f"cannot read the image geometry ({str(e)[:200]})") from e
    frame = np.eye(4)
    frame[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(spacing)
    frame[:3, 3] = origin
    return frame, np.asarray(size[:3], dtype=np.int64)


def _inside(frame: np.ndarray, size: np.ndarray, point_lps: Sequence[float]) -> bool:
    index = np.linalg.solve(frame, np.append(np.asarray(point_lps, dtype=np.float64), 1.0))[:3]
    return bool(np.all(index >= -0.5) and np.all(index <= size - 0.5))


class DetectionDatalist:
    """The export's Decathlon-style datalist: checks the annotations before any work, written when the run ends.

    Args:
        writer: the run's :class:`~hyper_dm.engines.CaseWriter` (its folder and file names).
        key: datalist key of this export's cases (``validation``: what the detection bundle's inference reads;
            ``training`` for a training export). Other keys already in ``{outdir}/datalist.json`` are kept, so a
            training and a validation export can share one folder and one datalist.
        annotations: LUNA16 ``annotations.csv`` (or the folder holding it): adds ``box`` / ``label`` to every
            entry (series without nodules get empty lists); ``None``: images only.
        absent_series: ``error``: annotations of series that are not exported stop the run before any work,
            naming them; ``ignore``: they are left out (logged).
    """

    def __init__(self, writer: CaseWriter, key: str = "validation", annotations: str | Path | None = None,
                 absent_series: str = "error") -> None:
        if key not in DATALIST_KEYS:
            raise ConfigError(f"export_cfg#datalist_key must be one of {list(DATALIST_KEYS)}, got {key!r}")
        self.writer, self.key = writer, key
        self.annotations = None if annotations in (None, "") else Path(annotations)
        self.absent_series = AbsentSeries.parse(absent_series)
        self.entries: list[dict] = []
        self.boxes: dict[str, list[list[float]]] = {}

    @property
    def path(self) -> Path:
        return output_path(self.writer.output_dir, Path(DATALIST_NAME).stem, Path(DATALIST_NAME).suffix)

    def cases(self, data: Mapping, source: str | None, skip_existing: bool = False) -> list[dict]:
        """The cases to reconstruct (as :func:`~hyper_dm.inference.case_entries`: ``source`` or the test split of
        ``data#dataset_dir``), after checking the annotations against every series of ``source``; nothing is
        written before these checks pass."""
        data = resolve_data_config(data)
        if data["task"] != "ct":
            raise BadInputError(source or data.get("dataset_dir") or "data#task",
                                f"the detection export is for CT (data#task ct), got task {data['task']!r}")
        self.entries = input_entries(data, source)
        self.boxes = self._check_annotations(self.entries)
        todo = set(self.writer.pending([e["case_id"] for e in self.entries], skip_existing))
        return [e for e in self.entries if e["case_id"] in todo]

    def _check_annotations(self, entries: Sequence[Mapping]) -> dict[str, list[list[float]]]:
        if self.annotations is None:
            return {}
        by_case = {e["case_id"]: e for e in entries}
        csv_path, nodules = annotations_of(
            self.annotations, lambda uid: _case_id(uid) in by_case, self.absent_series, "export_cfg",
            f"not among the {len(by_case)} series to export", "export them too (inference_cfg#input), or set ")
        boxes: dict[str, list[list[float]]] = {}
        for uid, found in nodules.items():
            entry = by_case[_case_id(uid)]
            frame, size = series_world_frame(entry["image"])
            for nodule in found:
                if not _inside(frame, size, nodule["coord_mm"]):
                    corners = [frame @ np.array([*c, 1.0]) for c in ((-0.5,) * 3, tuple(size - 0.5))]
                    lo, hi = np.minimum(*corners)[:3], np.maximum(*corners)[:3]
                    raise BadInputError(csv_path, f"series {uid}: the nodule at world (LPS) "
                                                  f"{[round(c, 2) for c in nodule['coord_mm']]} mm lies outside its "
                                                  f"volume {entry['image']} (world extent {lo.round(1).tolist()} .. "
                                                  f"{hi.round(1).tolist()} mm); annotations must be LUNA16 world "
                                                  "coordinates (mm, LPS), not voxel indices")
            boxes[entry["case_id"]] = [nodule_box(n["coord_mm"], n["diameter_mm"]) for n in found]
        return boxes

    def write(self) -> Path:
        """Write ``{outdir}/datalist.json`` (atomic) listing every case of this export found complete in the
        folder under ``key``; return its path. Cases that are missing (skipped as bad) are logged."""
        root = self.writer.output_dir.resolve()
        items, missing = [], []
        for entry in self.entries:
            case_id = entry["case_id"]
            image = self.writer.volume_path(case_id, "mean")
            if not image.is_file():
                missing.append(case_id)
                continue
            item = {"image": image.relative_to(root).as_posix()}
            item.update({name: self.writer.volume_path(case_id, name).relative_to(root).as_posix()
                         for name in UNCERTAINTY_KEYS})
            if self.annotations is not None:
                item["box"] = self.boxes.get(case_id, [])
                item["label"] = [NODULE_CLASS] * len(item["box"])
            items.append(item)
        content = {}
        if self.path.is_file():
            try:
                content = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                logger.warning("replacing unreadable %s (%s)", self.path, e)
            content = content if isinstance(content, dict) else {}
        content[self.key] = items
        with atomic_write(self.path) as tmp:
            tmp.write_text(json.dumps(content, indent=2) + "\n")
        if missing:
            logger.warning("datalist leaves out %d case(s) with no exported volume: %s", len(missing),
                           ", ".join(missing[:5]))
        logger.info("wrote %s: %d image(s) under %r%s", self.path, len(items), self.key,
                    f", {sum(len(i['box']) for i in items)} box(es)" if self.annotations is not None else "")
        return self.path


def _case_id(seriesuid: str) -> str:
    try:
        return safe_stem(seriesuid)
    except ValueError:
        return seriesuid  # matches no case


def run_export(evaluator: VolumeEvaluator, datalist: DetectionDatalist) -> Path:
    """Reconstruct, resample and write every pending case (:func:`~hyper_dm.inference.run_inference`), then write
    the datalist; return its path. Logs the seconds per series."""
    start = time.perf_counter()
    n_cases = len(evaluator.data_loader)
    skipped = run_inference(evaluator)
    path = datalist.write()
    done = n_cases - len(skipped)
    if done:
        seconds = time.perf_counter() - start
        logger.info("export: %d series in %.1f s (%.1f s per series, reconstruction, resampling and writing)", done,
                    seconds, seconds / done)
    return path
