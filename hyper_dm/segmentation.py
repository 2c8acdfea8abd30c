"""Nodule segmentation on what Hyper-DM gives: does reconstruction, and knowing its uncertainty, change what a nodule
model finds?

The workflow (``bundle/configs/segmentation.yaml``) trains and evaluates one MONAI segmentation network per input
*variant* on the same series, masks and budget:

==================  =====================================================================  ========
variant             image channels (all on the series' own grid)                           channels
==================  =====================================================================  ========
``reference``       the full-dose series itself (``.mhd`` / NIfTI / DICOM, HU)             1
``fbp``             the sparse-view FBP the model was given: ``{case}_cond.nii.gz`` (HU)   1
``hyperdm``         the Hyper-DM posterior mean ``{case}_mean.nii.gz`` (HU)                1
``hyperdm_eu_au``   mean, EU and AU: ``{case}_{mean,eu,au}.nii.gz`` (HU, HU^2, HU^2)       3
==================  =====================================================================  ========

The reconstructions are an inference run in ``simulate`` mode over the series (``inference_cfg#write_cond: true``
adds the FBP), in the layout of :class:`~hyper_dm.engines.CaseWriter`. Labels: each LUNA16 annotation (world
centre ``coordX/Y/Z`` in ITK/LPS mm, ``diameter_mm``) is rasterised as a ball in the series' geometry
(:func:`sphere_mask`), all of a series' nodules in one binary mask ``{workdir}/masks/{case}_nodules.nii.gz``
(uint8, the series' grid and RAS affine, as MONAI's readers give it).

:func:`prepare_segmentation` checks everything before it writes anything (annotations of series that are not in
the dataset, a nodule outside its series, a variant's volume missing or on another grid: a ``BadInputError`` naming
the file), then writes the masks and ``{workdir}/datalist_{variant}.json``::

    {"training":   [{"image": <path> | [<mean>, <eu>, <au>], "label": "masks/<case>_nodules.nii.gz",
                     "case_id": <case>}, ...],      the dataset's training split
     "validation": [...]}                          its validation and test splits (evaluated, never selected on)

paths relative to the JSON's folder (MONAI's ``load_decathlon_datalist`` reads it).

Example::

    >>> mask = sphere_mask([{"coord_mm": [10.0, -4.0, -120.0], "diameter_mm": 8.0}], index_to_lps, (128, 128, 16))
    >>> prepare_segmentation(data, "hyperdm_eu_au", "bundle/models/results", None, "bundle/models/segmentation")
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path

import nibabel as nib
import numpy as np

from .config import parse_choice
from .data.config import dataset_root, resolve_data_config
from .data.datasets import build_datalist
from .data.validation import BadInputError
from .engines.writer import CaseWriter
from .export import AbsentSeries, annotations_of, series_world_frame
from .io import atomic_write, output_path

__all__ = ["LPS_TO_RAS", "Variant", "prepare_segmentation", "sphere_mask"]

logger = logging.getLogger("hyper_dm.segmentation")

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""World ITK/LPS -> NIfTI/RAS (its own inverse): ``affine_ras = LPS_TO_RAS @ index_to_lps``."""
_GRID_ATOL_MM = 1e-3


class Variant(str, Enum):
    """The segmentation network's input (see the module docstring)."""

    REFERENCE = "reference"
    FBP = "fbp"
    HYPERDM = "hyperdm"
    HYPERDM_EU_AU = "hyperdm_eu_au"

    @classmethod
    def parse(cls, value: str) -> Variant:
        return parse_choice(cls, value, "segmentation_cfg#variant")

    @property
    def volumes(self) -> tuple[str, ...]:
        """The reconstruction volumes (CaseWriter names) stacked as channels; none for the reference."""
        return {"reference": (), "fbp": ("cond",), "hyperdm": ("mean",), "hyperdm_eu_au": ("mean", "eu", "au")}[
            self.value]

    @property
    def in_channels(self) -> int:
        return max(1, len(self.volumes))


def sphere_mask(nodules: Sequence[Mapping], index_to_lps: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Boolean mask ``[X, Y, Z]`` of the voxels whose centres lie in any nodule ball.

    ``nodules``: ``{"coord_mm": [x, y, z] (world LPS mm), "diameter_mm": d}`` (as ``read_annotations`` gives them);
    ``index_to_lps [4, 4]``: voxel index ``(i, j, k)`` -> world LPS mm (:func:`hyper_dm.export.series_world_frame`).
    A ball too small to hold a voxel centre keeps the voxel holding its centre, so no annotated nodule is lost.
    A centre outside the grid is a ``ValueError`` naming it.
    """
    shape = np.asarray(shape[:3], dtype=np.int64)
    mask = np.zeros(tuple(shape), dtype=bool)
    to_index = np.linalg.inv(index_to_lps)
    voxel_mm = np.linalg.norm(index_to_lps[:3, :3], axis=0)  # spacing along i, j, k
    for nodule in nodules:
        centre = np.asarray(nodule["coord_mm"], dtype=np.float64)
        radius = float(nodule["diameter_mm"]) / 2
        middle = (to_index @ np.append(centre, 1.0))[:3]
        if np.any(middle < -0.5) or np.any(middle > shape - 0.5):
            raise ValueError(f"nodule centre {np.round(centre, 2).tolist()} mm (LPS) lies outside the grid (voxel "
                             f"{np.round(middle, 1).tolist()} of {shape.tolist()})")
        reach = np.ceil(radius / voxel_mm).astype(np.int64) + 1
        lo = np.clip(np.floor(middle).astype(np.int64) - reach, 0, shape - 1)
        hi = np.clip(np.ceil(middle).astype(np.int64) + reach, 0, shape - 1)
        axes = [np.arange(a, b + 1) for a, b in zip(lo, hi, strict=True)]
        index = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).astype(np.float64)  # [x, y, z, 3]
        world = index @ index_to_lps[:3, :3].T + index_to_lps[:3, 3]
        inside = np.sum((world - centre) ** 2, axis=-1) <= radius**2
        box = tuple(slice(a, b + 1) for a, b in zip(lo, hi, strict=True))
        mask[box] |= inside
        if not inside.any():
            mask[tuple(np.clip(np.rint(middle).astype(np.int64), 0, shape - 1))] = True
    return mask


def _check_grid(path: Path, affine_ras: np.ndarray, shape: np.ndarray, case_id: str, source: str) -> None:
    try:
        header = nib.load(path)
    except FileNotFoundError:
        raise BadInputError(path, f"missing: case {case_id} has no such volume") from None
    except Exception as e:  # nibabel raises several types for foreign files
        raise BadInputError(path, f"cannot be read as NIfTI ({type(e).__name__}: {e})") from e
    if tuple(header.shape[:3]) != tuple(shape) or not np.allclose(header.affine, affine_ras, atol=_GRID_ATOL_MM):
        raise BadInputError(path, f"its grid (shape {tuple(header.shape[:3])}, affine "
                                  f"{np.round(header.affine, 3).tolist()}) is not that of the series {source} (shape "
                                  f"{tuple(shape.tolist())}, affine {np.round(affine_ras, 3).tolist()}); the masks "
                                  "are drawn on the series' grid: reconstruct with inference (not the resampled "
                                  "export)")


def prepare_segmentation(data: Mapping, variant: str, reconstructions: str | Path | None,
                         annotations: str | Path | None, workdir: str | Path, absent_series: str = "error") -> Path:
    """Check, then write the nodule masks and the variant's datalist (see the module docstring); return its path.

    Args:
        data: the bundle's ``data`` section: its dataset (``data#dataset_dir``) and split give the series.
        variant: a :class:`Variant` value.
        reconstructions: the inference output folder holding ``{case}/{case}_{cond,mean,eu,au}.nii.gz`` (unused for
            ``reference``).
        annotations: LUNA16 ``annotations.csv`` (or its folder); ``None``: the one in the dataset folder.
        workdir: gets ``masks/`` and ``datalist_{variant}.json``.
        absent_series: annotations of series not in the dataset: ``error`` or ``ignore`` (logged).
    """
    variant = Variant.parse(variant)
    data = resolve_data_config(data)
    policy = AbsentSeries.parse(absent_series)
    splits = build_datalist(data)
    cases = {c["case_id"]: c for split in splits.values() for c in split}
    csv_path, nodules = annotations_of(
        annotations if annotations not in (None, "") else dataset_root(data), cases.__contains__, policy,
        "segmentation_cfg", f"not in the dataset {dataset_root(data)}", "set ")
    if reconstructions in (None, "") and variant.volumes:
        raise BadInputError("segmentation_cfg#reconstructions", f"variant {variant.value!r} reads reconstructions: "
                                                                 "give the inference output folder")
    layout = CaseWriter(reconstructions, previews=False) if variant.volumes else None
    workdir = Path(workdir)
    masks, split_items = {}, {"training": [], "validation": []}
    for split, entries in splits.items():
        for case in entries:
            case_id, source = case["case_id"], case["image"]
            frame, shape = series_world_frame(source)
            try:
                masks[case_id] = (sphere_mask(nodules.get(case_id, []), frame, shape), LPS_TO_RAS @ frame)
            except ValueError as e:
                raise BadInputError(csv_path, f"series {case_id}: {e}; annotations must be LUNA16 world coordinates "
                                              "(mm, LPS), not voxel indices") from None
            if layout is None:
                image: str | list[str] = source
            else:
                files = [layout.volume_path(case_id, name) for name in variant.volumes]
                for name, file in zip(variant.volumes, files, strict=True):
                    if not file.is_file():
                        raise BadInputError(file, f"variant {variant.value!r} needs the {name} volume of case "
                                                  f"{case_id}; reconstruct every series into {reconstructions} "
                                                  "(inference_cfg#input_mode simulate, inference_cfg#write_cond "
                                                  "true for 'fbp')")
                    _check_grid(file, LPS_TO_RAS @ frame, shape, case_id, source)
                image = [str(f) for f in files] if len(files) > 1 else str(files[0])
            label = output_path(workdir / "masks", f"{case_id}_nodules", ".nii.gz")
            split_items["training" if split == "training" else "validation"].append(
                {"image": image, "label": str(label), "case_id": case_id})
    (workdir / "masks").mkdir(parents=True, exist_ok=True)
    for case_id, (mask, affine_ras) in masks.items():
        with atomic_write(output_path(workdir / "masks", f"{case_id}_nodules", ".nii.gz")) as tmp:
            nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine_ras), tmp)
    relative = lambda p: os.path.relpath(Path(p).resolve(), workdir.resolve())  # noqa: E731
    content = {split: [{**item, "image": [relative(p) for p in item["image"]] if isinstance(item["image"], list)
                        else relative(item["image"]), "label": relative(item["label"])}
                       for item in items] for split, items in split_items.items()}
    path = output_path(workdir, f"datalist_{variant.value}", ".json")
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2) + "\n")
    n_nodules = sum(len(nodules.get(c, [])) for c in cases)
    logger.info("segmentation %s: %d training / %d validation series, %d nodule(s), masks in %s -> %s",
                variant.value, len(content["training"]), len(content["validation"]), n_nodules, workdir / "masks",
                path)
    return path
