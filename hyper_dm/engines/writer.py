"""Ignite handler that restacks per-slice reconstructions into case volumes and writes them.

For each case, once all of its slices have arrived, :class:`CaseWriter` writes into ``output_dir``
(``{stem}`` is the case id checked by :func:`hyper_dm.io.safe_stem`)::

    {stem}_mean.nii.gz   posterior mean            [S, S, n_slices] float32, physical units (CT: HU)
    {stem}_eu.nii.gz     epistemic variance        squared physical units
    {stem}_au.nii.gz     aleatoric variance        squared physical units
    {stem}_total.nii.gz  eu + au (law of total variance, computed from the two files' float32 values)
    {stem}_{eu,au,total}_std.nii.gz   square roots of the above (``write_std=True``)
    {stem}_preview.png   middle slice: cond | mean | EU | AU | |error| | target
    {stem}_metrics.json  and a row of metrics.csv, when the slices carry a target

Every file is written atomically, with the case's NIfTI (RAS, mm) affine; existing files are never replaced
unless ``overwrite=True``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import decollate_batch
from monai.utils import convert_to_numpy

from ..io import atomic_write, check_no_overwrite, output_path, safe_stem
from ..uncertainty import psnr, ssim
from .previews import write_preview

__all__ = ["METRIC_FIELDS", "CaseWriter"]

logger = logging.getLogger("hyper_dm.writer")

METRIC_FIELDS = ("case_id", "n_slices", "psnr_db", "ssim", "crps", "mean_eu", "mean_au")
_VARIANCES = ("eu", "au", "total")
_DESCRIPTIONS = {
    "mean": "hyper_dm posterior mean",
    "eu": "hyper_dm epistemic variance (units^2)",
    "au": "hyper_dm aleatoric variance (units^2)",
    "total": "hyper_dm total variance eu+au (units^2)",
    "eu_std": "hyper_dm epistemic standard deviation",
    "au_std": "hyper_dm aleatoric standard deviation",
    "total_std": "hyper_dm total standard deviation",
}


@dataclass
class _Slice:
    """One slice in the model range: images ``[S, S]`` float32 and its intensity map to physical units."""

    pred: np.ndarray
    eu: np.ndarray
    au: np.ndarray
    label: np.ndarray | None
    cond: np.ndarray | None  # kept for the preview slice only
    scale: float
    offset: float
    crps: float | None


@dataclass
class _Case:
    case_id: str
    stem: str
    n_slices: int
    affine: np.ndarray  # [4, 4] float64
    slices: dict[int, _Slice] = field(default_factory=dict)

    @property
    def preview_index(self) -> int:
        return self.n_slices // 2


class CaseWriter:
    """Writes NIfTI mean/EU/AU/total volumes, metrics and previews per case from evaluator outputs.

    Attach to a MONAI ``Evaluator`` (or any Ignite ``Engine``) with :meth:`attach`. At every
    ``ITERATION_COMPLETED`` it reads ``engine.state.output`` and ``engine.state.batch``, either decollated
    (lists of per-slice dicts, MONAI's default) or batch-first dicts. Per slice, output and batch dicts are
    merged (output wins) and must provide:

    - ``pred``, ``eu``, ``au``: ``[1, S, S]`` posterior mean and variances in the model's normalised range;
      optional ``label`` (or ``target``) ``[1, S, S]``, ``cond`` ``[1, S, S]`` and ``crps`` (slice mean).
    - ``case_id`` (str), ``slice_index`` (int, ``0 <= k < n_slices``), ``n_slices`` (int), ``affine``
      (``[4, 4]`` NIfTI RAS affine of the ``[S, S, n_slices]`` grid; identity with a warning if absent),
      and optionally ``intensity_scale``/``intensity_offset``: ``physical = scale * x + offset`` (CT: HU),
      variances map by ``scale**2``. Identity when absent.

    Slices may arrive in any order and mixed across batches; the case is written as soon as all of its
    slices are in (stacked along the last axis by ``slice_index``). Metrics (only with a target): ``psnr_db``
    over the whole volume and ``ssim`` (mean over slices) in the model range with ``data_range``; ``crps``
    (mean over slices, physical units), ``mean_eu``/``mean_au`` (physical units squared).

    Args:
        output_dir: directory for every output (created if needed).
        overwrite: replace existing outputs; otherwise ``FileExistsError`` as soon as a case's first slice
            arrives, before anything of that case is written.
        write_std: also write standard-deviation maps ``_eu_std``, ``_au_std``, ``_total_std``.
        previews: write the PNG preview of each case's middle slice.
        data_range: value range of the normalised images for PSNR/SSIM (2 for [-1, 1]).

    Attributes:
        written: one dict per case written in the current run: ``case_id``, ``stem``, ``n_slices``,
            ``paths`` (name -> ``Path``) and ``metrics`` (dict, or ``None`` without a target).
        incomplete: ``case_id -> (slices received, n_slices)`` for cases still missing slices at
            ``COMPLETED`` (also logged as a warning).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        overwrite: bool = False,
        write_std: bool = False,
        previews: bool = True,
        data_range: float = 2.0,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.overwrite, self.write_std, self.previews = bool(overwrite), bool(write_std), bool(previews)
        self.data_range = float(data_range)
        self.written: list[dict] = []
        self.incomplete: dict[str, tuple[int, int]] = {}
        self._pending: dict[str, _Case] = {}
        self._stems: dict[str, str] = {}  # stem -> case id, this run

    def attach(self, engine: Engine) -> None:
        """Register on ``STARTED`` (reset), ``ITERATION_COMPLETED`` (collect/write) and ``COMPLETED`` (report)."""
        if not engine.has_event_handler(self, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.STARTED, self.reset)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)
            engine.add_event_handler(Events.COMPLETED, self.report_incomplete)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget partial cases and the record of the previous run."""
        self.written, self.incomplete, self._pending, self._stems = [], {}, {}, {}

    def __call__(self, engine: Engine) -> None:
        for item in _slice_items(engine.state.output, engine.state.batch):
            self.add_slice(item)

    def report_incomplete(self, engine: Engine | None = None) -> None:
        """Warn about cases whose slices did not all arrive; fills :attr:`incomplete`."""
        self.incomplete = {cid: (len(c.slices), c.n_slices) for cid, c in self._pending.items()}
        for cid, (got, total) in self.incomplete.items():
            missing = sorted(set(range(total)) - set(self._pending[cid].slices))
            logger.warning("case %s not written: %d of %d slices arrived (missing slice indices %s)",
                           cid, got, total, missing)

    def add_slice(self, item: Mapping) -> None:
        """Collect one merged per-slice dict (see the class docstring); writes the case when it is complete."""
        for key in ("case_id", "slice_index", "n_slices", "pred", "eu", "au"):
            if key not in item:
                raise KeyError(f"CaseWriter: slice has no {key!r} (keys: {sorted(map(str, item))}); the evaluator "
                               "output or the batch must carry it")
        case_id, index, n_slices = str(item["case_id"]), int(item["slice_index"]), int(item["n_slices"])
        case = self._pending.get(case_id) or self._open_case(case_id, n_slices, item)
        if n_slices != case.n_slices:
            raise ValueError(f"case {case_id}: slice {index} says n_slices={n_slices}, earlier slices {case.n_slices}")
        if not 0 <= index < n_slices:
            raise ValueError(f"case {case_id}: slice_index {index} outside [0, {n_slices})")
        if index in case.slices:
            raise ValueError(f"case {case_id}: slice {index} arrived twice (duplicate entries in the datalist?)")
        label = item.get("label", item.get("target"))
        case.slices[index] = _Slice(
            pred=_image(item["pred"], "pred", case_id, index),
            eu=_image(item["eu"], "eu", case_id, index),
            au=_image(item["au"], "au", case_id, index),
            label=None if label is None else _image(label, "label", case_id, index),
            cond=_image(item["cond"], "cond", case_id, index)
            if index == case.preview_index and item.get("cond") is not None else None,
            scale=float(item.get("intensity_scale", 1.0)),
            offset=float(item.get("intensity_offset", 0.0)),
            crps=None if item.get("crps") is None else float(item["crps"]),
        )
        if len(case.slices) == case.n_slices:
            self._write(self._pending.pop(case_id))

    def _open_case(self, case_id: str, n_slices: int, item: Mapping) -> _Case:
        stem = safe_stem(case_id)
        if stem in self._stems:
            other = self._stems[stem]
            raise ValueError(f"case {case_id}: " + (
                "more slices arrived after the case was written (duplicate entries in the datalist?)"
                if other == case_id else f"output name {stem!r} is already used by case {other}"))
        if n_slices < 1:
            raise ValueError(f"case {case_id}: n_slices must be >= 1, got {n_slices}")
        if item.get("affine") is None:
            logger.warning("case %s has no 'affine'; writing it with an identity affine (1 mm voxels)", case_id)
            affine = np.eye(4)
        else:
            affine = convert_to_numpy(item["affine"], dtype=np.float64)
            if affine.shape != (4, 4) or not np.isfinite(affine).all():
                raise ValueError(f"case {case_id}: 'affine' must be a finite [4, 4] matrix, got shape {affine.shape}")
        has_label = item.get("label", item.get("target")) is not None
        check_no_overwrite(self._paths(stem, has_label).values(), self.overwrite)
        self._stems[stem] = case_id
        case = self._pending[case_id] = _Case(case_id, stem, n_slices, affine)
        return case

    def _paths(self, stem: str, has_label: bool) -> dict[str, Path]:
        names = ["mean", *_VARIANCES] + ([f"{v}_std" for v in _VARIANCES] if self.write_std else [])
        paths = {name: output_path(self.output_dir, stem, f"_{name}.nii.gz") for name in names}
        if self.previews:
            paths["preview"] = output_path(self.output_dir, stem, "_preview.png")
        if has_label:
            paths["metrics"] = output_path(self.output_dir, stem, "_metrics.json")
        return paths

    def _write(self, case: _Case) -> None:
        slices = [case.slices[k] for k in range(case.n_slices)]
        has_label = all(s.label is not None for s in slices)
        paths = self._paths(case.stem, has_label)
        check_no_overwrite(paths.values(), self.overwrite)
        self.output_dir.mkdir(parents=True, exist_ok=True)

        scale = np.array([s.scale for s in slices], dtype=np.float32)  # [n]
        offset = np.array([s.offset for s in slices], dtype=np.float32)
        stack = lambda key: np.stack([getattr(s, key) for s in slices], axis=-1)  # noqa: E731  [S, S, n]
        volumes = {"mean": stack("pred") * scale + offset, "eu": stack("eu") * scale**2, "au": stack("au") * scale**2}
        volumes["total"] = volumes["eu"] + volumes["au"]
        if self.write_std:
            volumes.update({f"{v}_std": np.sqrt(np.clip(volumes[v], 0.0, None)) for v in _VARIANCES})
        for name, volume in volumes.items():
            _save_nifti(paths[name], volume, case.affine, _DESCRIPTIONS[name])

        metrics = None
        if has_label:
            metrics = self._metrics(case, slices, volumes)
            with atomic_write(paths["metrics"]) as tmp:
                tmp.write_text(json.dumps(metrics, indent=2) + "\n")
            _update_csv(output_path(self.output_dir, "metrics", ".csv"), metrics)
        if self.previews:
            mid = slices[case.preview_index]
            physical = lambda x: None if x is None else x * mid.scale + mid.offset  # noqa: E731
            with atomic_write(paths["preview"]) as tmp:
                write_preview(tmp, volumes["mean"][..., case.preview_index], volumes["eu"][..., case.preview_index],
                              volumes["au"][..., case.preview_index], cond=physical(mid.cond),
                              target=physical(mid.label), title=f"{case.case_id}  slice {case.preview_index}")
        self.written.append({"case_id": case.case_id, "stem": case.stem, "n_slices": case.n_slices,
                             "paths": paths, "metrics": metrics})
        logger.info("wrote case %s (%d slices): %s", case.case_id, case.n_slices,
                    ", ".join(str(p) for p in paths.values()))

    def _metrics(self, case: _Case, slices: list[_Slice], volumes: dict[str, np.ndarray]) -> dict:
        pred = torch.from_numpy(np.stack([s.pred for s in slices]))[:, None]  # [n, 1, S, S] model range
        label = torch.from_numpy(np.stack([s.label for s in slices]))[:, None]
        crps = [abs(s.scale) * s.crps for s in slices if s.crps is not None]
        values = {
            "case_id": case.case_id,
            "n_slices": case.n_slices,
            "psnr_db": psnr(pred.reshape(1, 1, -1, pred.shape[-1]), label.reshape(1, 1, -1, pred.shape[-1]),
                            self.data_range).item(),
            "ssim": ssim(pred, label, self.data_range).mean().item(),
            "crps": float(np.mean(crps)) if crps else None,
            "mean_eu": float(volumes["eu"].mean(dtype=np.float64)),
            "mean_au": float(volumes["au"].mean(dtype=np.float64)),
        }
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def _slice_items(output: object, batch: object) -> list[Mapping]:
    """Per-slice dicts from ``state.output`` merged over ``state.batch`` (decollated lists or batch-first dicts)."""
    outputs = _decollated(output)
    if outputs is None:
        raise TypeError(f"CaseWriter: engine.state.output must be a dict or a list of dicts, got {type(output)}")
    inputs = _decollated(batch)
    if inputs is None:
        return outputs
    if len(inputs) != len(outputs):
        raise ValueError(f"CaseWriter: batch has {len(inputs)} items but output has {len(outputs)}")
    return [{**b, **o} for b, o in zip(inputs, outputs, strict=True)]


def _decollated(data: object) -> list[Mapping] | None:
    if isinstance(data, Mapping):  # raw samples [M*N, B, ...] are not batch-first: leave them out
        return decollate_batch({k: v for k, v in data.items() if v is not None and k != "samples"}, detach=True)
    if isinstance(data, list) and all(isinstance(d, Mapping) for d in data):
        return data
    return None


def _image(x: object, key: str, case_id: str, index: int) -> np.ndarray:
    """``[1, S, S]`` or ``[S, S]`` tensor/array -> ``[S, S]`` float32 array."""
    array = convert_to_numpy(x, dtype=np.float32)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"case {case_id} slice {index}: {key!r} must be [1, S, S], got shape {array.shape}")
    return array


def _save_nifti(path: Path, volume: np.ndarray, affine: np.ndarray, description: str) -> None:
    image = nib.Nifti1Image(volume.astype(np.float32), affine)
    image.set_sform(affine, code="scanner")
    image.set_qform(affine, code="scanner")
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = description.encode()[:79]
    with atomic_write(path) as tmp:
        nib.save(image, tmp)


def _update_csv(path: Path, row: Mapping) -> None:
    """Rewrite ``path`` atomically with ``row`` replacing any earlier row of the same case."""
    rows: list[dict] = []
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != METRIC_FIELDS:
                raise ValueError(f"{path} has columns {reader.fieldnames}, expected {list(METRIC_FIELDS)}; "
                                 "move it away or choose another output directory")
            rows = [r for r in reader if r["case_id"] != row["case_id"]]
    rows.append({k: "" if row[k] is None else row[k] for k in METRIC_FIELDS})
    with atomic_write(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
