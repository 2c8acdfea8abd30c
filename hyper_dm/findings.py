"""Uncertainty per finding: EU / AU / total inside each detected box or labelled region of an export.

Inputs:

- an export (:mod:`hyper_dm.export`): its folder or ``datalist.json``; each entry's ``image`` (HU) and the
  ``eu`` / ``au`` / ``total`` variance volumes beside it (HU^2);
- findings, either
  - detections as MONAI's ``lung_nodule_ct_detection`` bundle writes them (``eval/result_*.json``: a list of
    ``{"image", "box", "label", "label_scores"}``), or a datalist-style ``{"validation": [{"image", "box",
    "score"|"label_scores", "label"}]}``; boxes are ``cccwhd`` in world mm, ITK/LPS frame (the bundle's
    ``AffineBoxToWorldCoordinated(affine_lps_to_ras=True)`` output, LUNA16's ``annotations.csv`` frame); an
    ``image`` is matched to the export by path (absolute, or relative to the export folder, or its tail);
  - label volumes on the exported grid: a NIfTI file (with ``image`` naming the exported image, unless the export
    has one), or a JSON ``{"validation": [{"image": ..., "label": <label file>}]}``. Each positive label value is
    a finding; a binary (0/1) mask is split into connected components (26-connectivity).

Per finding: voxels (box: those whose centres lie in the box, the box taken as its bounding box on the voxel grid;
label: the region), ``n_voxels``, mean and max of EU, AU and total (HU^2), and ``eu_high``: ``eu_mean`` above
the EU threshold. The threshold is a given value (``eu_threshold``, HU^2) or the ``eu_quantile`` of the EU
voxels of the ``validation`` split of a reference export (default: the export itself), a fixed stride of at most
2^21 voxels per volume; the rule is stated in both outputs. A region's mean is compared with a voxel quantile:
voxel EU is heavy-tailed (edges, bone), so region means lie well below the high voxel quantiles (measured on one
synthetic case with the 60-epoch CPU x0 model of docs/report.md: the mean EU over an inserted object, 24 x that of
the same region without it, lay below the 0.99 voxel quantile and above the 0.95 one; hence the default 0.95).

Written: ``findings.json`` (settings + one record per finding) and ``findings.csv`` (one row per finding), after
every input has been checked (nothing half-way).

Example::

    >>> run_findings("data/recon_ct", detections="eval/result_luna16_fold0.json", eu_quantile=0.95)
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from .config import ConfigError
from .data.datalist import datalist_split
from .data.validation import BadInputError
from .export import DATALIST_KEYS, DATALIST_NAME, UNCERTAINTY_KEYS
from .io import atomic_write, check_no_overwrite, output_path

__all__ = ["ExportImage", "Finding", "box_voxels", "eu_threshold", "find_findings", "read_export", "run_findings"]

logger = logging.getLogger("hyper_dm.findings")

BOX_CONVENTION = "cccwhd (centre x, y, z, then width, height, depth), world mm, ITK/LPS frame"
_QUANTILE_VOXELS = 1 << 21
_CSV_FIELDS = ("image", "case_id", "finding", "source", "label", "score", "box_x", "box_y", "box_z", "box_w",
               "box_h", "box_d", "n_voxels", "eu_mean", "eu_max", "au_mean", "au_max", "total_mean", "total_max",
               "eu_high", "eu_threshold")


@dataclass(frozen=True)
class ExportImage:
    """One exported image: ``image`` (HU) and its ``volumes`` (``eu``/``au``/``total`` paths), ``name`` relative
    to the export folder."""

    name: str
    image: Path
    volumes: dict[str, Path]
    split: str


@dataclass
class Finding:
    """One finding of one exported image: a ``box`` (``cccwhd`` LPS mm) or a label region (``label_value``)."""

    image: ExportImage
    index: int
    source: str  # "detection" | "label"
    label: int
    score: float | None = None
    box: list[float] | None = None
    region: np.ndarray | None = field(default=None, repr=False)  # boolean [X, Y, Z] (labels)


def read_export(export: str | Path) -> tuple[Path, dict[str, ExportImage]]:
    """The export's datalist (a folder holding ``datalist.json``, or the JSON itself) -> ``(root, images)`` keyed
    by the image path relative to the export folder; every listed file must exist."""
    path = Path(export)
    datalist = path / DATALIST_NAME if path.is_dir() else path
    if not datalist.is_file():
        raise BadInputError(datalist, "no export datalist here; give the folder written by the export (holding "
                                      f"{DATALIST_NAME}) or its datalist JSON")
    try:
        content = json.loads(datalist.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(datalist, f"is not a readable JSON datalist ({e})") from e
    if not isinstance(content, dict) or not any(k in content for k in DATALIST_KEYS):
        raise BadInputError(datalist, f"an export datalist needs one of the keys {list(DATALIST_KEYS)}")
    root = datalist.parent.resolve()
    images: dict[str, ExportImage] = {}
    for split in DATALIST_KEYS:
        for i, item in enumerate(content.get(split, [])):
            if not isinstance(item, dict) or not isinstance(item.get("image"), str):
                raise BadInputError(datalist, f'entry {i} of "{split}" needs an "image" path, got {item!r}')
            image = (root / item["image"]).resolve()
            volumes = {}
            for key in UNCERTAINTY_KEYS:
                given = item.get(key)
                volumes[key] = (root / given).resolve() if isinstance(given, str) else \
                    image.with_name(image.name.replace(".nii.gz", f"_{key}.nii.gz"))
            for what, file in (("image", image), *volumes.items()):
                if not file.is_file():
                    raise BadInputError(datalist, f'entry {i} of "{split}": its {what} file {file} does not exist; '
                                                  "was the export moved or interrupted?")
            name = image.relative_to(root).as_posix() if image.is_relative_to(root) else str(image)
            images.setdefault(name, ExportImage(name=name, image=image, volumes=volumes, split=split))
    if not images:
        raise BadInputError(datalist, "lists no images")
    return root, images


def _match(reference: str, root: Path, images: Mapping[str, ExportImage], source: Path) -> ExportImage:
    """The exported image that ``reference`` (a path as written by the detector, or relative to the export)
    names; an error naming ``reference`` and ``source`` otherwise."""
    path = Path(reference)
    resolved = (path if path.is_absolute() else root / path).resolve()
    for image in images.values():
        if image.image == resolved:
            return image
    posix = path.as_posix()
    tails = [image for name, image in images.items() if posix.endswith("/" + name) or posix == name]
    if len(tails) == 1:
        return tails[0]
    examples = ", ".join(list(images)[:3])
    raise BadInputError(source, f"image {reference!r} is not in the export {root} ({len(images)} image(s), e.g. "
                                f"{examples}); run the detector on the export's datalist, or export that series")


def _boxes_of(item: Mapping, index: int, source: Path) -> Iterator[tuple[list[float], float | None, int]]:
    boxes = item.get("box", [])
    scores = item.get("label_scores", item.get("score"))
    labels = item.get("label")
    if not isinstance(boxes, list) or scores is not None and (not isinstance(scores, list)
                                                              or len(scores) != len(boxes)):
        raise BadInputError(source, f"item {index} (image {item.get('image')!r}): 'box' must be a list of boxes "
                                    "with one score each ('label_scores' or 'score')")
    for k, box in enumerate(boxes):
        if not isinstance(box, list) or len(box) != 6 or not all(isinstance(v, (int, float)) for v in box) \
                or not np.isfinite(box).all() or min(box[3:]) <= 0:
            raise BadInputError(source, f"item {index} (image {item.get('image')!r}), box {k}: {box!r} is not a "
                                        f"cccwhd box (6 finite numbers, sizes > 0 mm)")
        label = labels[k] if isinstance(labels, list) and k < len(labels) else 0
        yield [float(v) for v in box], None if scores is None else float(scores[k]), int(label)


def read_detections(path: str | Path, root: Path, images: Mapping[str, ExportImage], min_score: float = 0.0
                    ) -> list[Finding]:
    """Detections (bundle result list or datalist-style dict, see the module docstring) -> findings with
    ``score >= min_score``, matched to the export's images."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInputError(path, "detections file does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(path, f"is not a readable detections JSON ({e})") from e
    if isinstance(content, dict):
        key = next((k for k in DATALIST_KEYS if k in content), None)
        content = content.get(key) if key else None
    if not isinstance(content, list):
        raise BadInputError(path, "expected the detection bundle's result list [{\"image\", \"box\", \"label\", "
                                  "\"label_scores\"}, ...] or a datalist-style {\"validation\": [...]}")
    findings: list[Finding] = []
    counts: dict[str, int] = {}
    for i, item in enumerate(content):
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            raise BadInputError(path, f"item {i} needs an 'image' path, got {item!r:.200}")
        image = _match(item["image"], root, images, path)
        for box, score, label in _boxes_of(item, i, path):
            n = counts.get(image.name, 0)
            counts[image.name] = n + 1
            if score is None or score >= min_score:
                findings.append(Finding(image=image, index=n, source="detection", label=label, score=score, box=box))
    return findings


def read_label_findings(labels: str | Path, root: Path, images: Mapping[str, ExportImage],
                        image: str | None = None) -> list[Finding]:
    """Label volumes (a NIfTI file for ``image``, or a JSON listing image/label pairs) -> one finding per label
    value (binary masks: per connected component). Each label volume must have its image's grid."""
    labels = Path(labels)
    if not labels.exists():
        raise BadInputError(labels, "label file does not exist")
    if labels.suffix.lower() == ".json":
        key, items = datalist_split(labels, DATALIST_KEYS, '{"image": <exported image>, "label": <label volume>}')
        pairs = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("image", "label")):
                raise BadInputError(labels, f'entry {i} of "{key}" needs "image" and "label" paths, got {item!r}')
            label = Path(item["label"])
            pairs.append((_match(item["image"], root, images, labels),
                          label if label.is_absolute() else labels.parent / label))
    else:
        if image is None and len(images) != 1:
            raise BadInputError(labels, f"which exported image does this label volume belong to? the export has "
                                        f"{len(images)} images; give findings_cfg#image (e.g. {next(iter(images))})")
        pairs = [(_match(image, root, images, labels) if image else next(iter(images.values())), labels)]
    findings: list[Finding] = []
    for exported, label_path in pairs:
        findings += _regions(exported, label_path)
    return findings


def _regions(image: ExportImage, label_path: Path) -> list[Finding]:
    try:
        label_img = nib.load(label_path)
        values = np.asarray(label_img.dataobj)
    except FileNotFoundError:
        raise BadInputError(label_path, f"label volume for {image.name} does not exist") from None
    except Exception as e:  # nibabel raises several types for foreign files
        raise BadInputError(label_path, f"cannot be read as a NIfTI label volume ({type(e).__name__}: {e})") from e
    reference = nib.load(image.image)
    values = values.reshape(values.shape[:3]) if values.ndim == 4 and values.shape[3] == 1 else values
    if values.shape != reference.shape[:3] or not np.allclose(label_img.affine, reference.affine, atol=1e-3):
        grid = f"shape {values.shape}, affine {np.round(label_img.affine, 3).tolist()}"
        expected = f"shape {reference.shape[:3]}, affine {np.round(reference.affine, 3).tolist()}"
        raise BadInputError(label_path, f"its grid ({grid}) is not that of the exported image {image.name} "
                                        f"({expected}); segment the exported image, or resample the labels to it "
                                        "(MONAI ResampleToMatch, nearest)")
    if not np.isfinite(values).all() or (values != np.round(values)).any() or values.min(initial=0) < 0:
        raise BadInputError(label_path, "a label volume holds non-negative integers (0: background)")
    values = values.astype(np.int64)
    present = np.unique(values[values > 0])
    if present.size and set(present.tolist()) == {1}:
        values, _ = ndimage.label(values, structure=np.ones((3, 3, 3)))
        present = np.arange(1, values.max() + 1)
    return [Finding(image=image, index=i, source="label", label=int(v), region=values == v)
            for i, v in enumerate(present)]


def box_voxels(box: Sequence[float], affine_ras: np.ndarray, shape: Sequence[int]) -> tuple[slice, slice, slice]:
    """Voxel index ranges of the voxels whose centres lie in ``box`` (``cccwhd``, world LPS mm) on an image with
    the nibabel (RAS) ``affine_ras`` and ``shape``; an oblique box becomes its bounding box on the grid, a box
    thinner than a voxel keeps the voxel of its centre. The box centre must lie in the image (``ValueError``)."""
    centre, size = np.asarray(box[:3], dtype=np.float64), np.asarray(box[3:], dtype=np.float64)
    to_voxel = np.linalg.inv(affine_ras)
    lps_to_ras = np.array([-1.0, -1.0, 1.0])

    def voxel(point_lps: np.ndarray) -> np.ndarray:
        return (to_voxel @ np.append(point_lps * lps_to_ras, 1.0))[:3]

    shape = np.asarray(shape[:3])
    middle = voxel(centre)
    if np.any(middle < -0.5) or np.any(middle > shape - 0.5):
        raise ValueError(f"centre {np.round(centre, 2).tolist()} mm lies outside the image (voxel "
                         f"{np.round(middle, 1).tolist()} of a {shape.tolist()} grid)")
    corners = np.array([voxel(centre + np.array(signs) * size / 2)
                        for signs in itertools.product((-1.0, 1.0), repeat=3)])
    lo = np.ceil(corners.min(axis=0) - 1e-6).astype(int)
    hi = np.floor(corners.max(axis=0) + 1e-6).astype(int)
    thin = lo > hi
    lo[thin] = hi[thin] = np.rint(middle[thin]).astype(int)
    lo, hi = np.clip(lo, 0, shape - 1), np.clip(hi, 0, shape - 1)
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def _region_box(region: np.ndarray, affine_ras: np.ndarray) -> list[float]:
    """Bounding box (``cccwhd``, LPS mm) of the voxels of ``region``."""
    index = np.argwhere(region)
    lo, hi = index.min(axis=0) - 0.5, index.max(axis=0) + 0.5
    corners = np.array([(affine_ras @ np.append(c, 1.0))[:3] * [-1.0, -1.0, 1.0]
                        for c in itertools.product(*zip(lo, hi, strict=True))])
    a, b = corners.min(axis=0), corners.max(axis=0)
    return [*((a + b) / 2).tolist(), *(b - a).tolist()]


def _stride_sample(values: np.ndarray) -> np.ndarray:
    flat = values.reshape(-1)
    return flat[:: max(1, flat.size // _QUANTILE_VOXELS)]


def eu_threshold(value: float | None, quantile: float | None, reference: str | Path) -> tuple[float, str]:
    """The EU threshold (HU^2) and the rule that gave it: ``value`` if given, else the ``quantile`` of the EU voxels
    of the ``validation`` split of the export ``reference``."""
    if value is not None:
        value = float(value)
        if not np.isfinite(value) or value < 0:
            raise ConfigError(f"findings_cfg#eu_threshold must be a variance >= 0 (HU^2), got {value}")
        return value, f"given value {value:g} HU^2"
    if quantile is None:
        raise ConfigError("give findings_cfg#eu_threshold (HU^2) or findings_cfg#eu_quantile (bundle default: "
                          "export.yaml)")
    quantile = float(quantile)
    if not 0 < quantile < 1:
        raise ConfigError(f"findings_cfg#eu_quantile must lie in (0, 1), got {quantile}")
    root, images = read_export(reference)
    split = [image for image in images.values() if image.split == "validation"]
    if not split:
        datalist = Path(reference) / DATALIST_NAME if Path(reference).is_dir() else Path(reference)
        raise BadInputError(datalist, "has no 'validation' split to take the EU quantile over; give "
                                                  "findings_cfg#eu_threshold or a reference export "
                                                  "(findings_cfg#reference) with a validation split")
    samples = np.concatenate([_stride_sample(np.asarray(nib.load(image.volumes["eu"]).dataobj, dtype=np.float32))
                              for image in split])
    threshold = float(np.quantile(samples, quantile))
    return threshold, (f"quantile {quantile:g} of EU over the validation split of {root} ({len(split)} image(s), "
                       f"{samples.size} voxels sampled)")


def find_findings(findings: Sequence[Finding], threshold: float) -> list[dict[str, Any]]:
    """Per-finding statistics (see the module docstring), image by image, each volume read once per image;
    raises ``BadInputError`` naming the image and the box for a box outside its image."""
    records: list[dict[str, Any]] = [{} for _ in findings]
    by_image: dict[str, list[int]] = {}
    for i, finding in enumerate(findings):
        by_image.setdefault(finding.image.name, []).append(i)
    for indices in by_image.values():
        image = findings[indices[0]].image
        header = nib.load(image.image)
        regions = {}
        for i in indices:
            finding = findings[i]
            if finding.box is not None:
                try:
                    regions[i] = box_voxels(finding.box, header.affine, header.shape)
                except ValueError as e:
                    raise BadInputError(image.image, f"detection {finding.index} (box {finding.box}): {e}") from None
            else:
                regions[i] = finding.region
        stats: dict[int, dict[str, float]] = {i: {} for i in indices}
        for key in UNCERTAINTY_KEYS:
            volume = np.asarray(nib.load(image.volumes[key]).dataobj, dtype=np.float32)
            if volume.shape[:3] != header.shape[:3]:
                raise BadInputError(image.volumes[key], f"shape {volume.shape} is not that of {image.image} "
                                                        f"{header.shape}; re-export the case")
            for i in indices:
                inside = volume[regions[i]].astype(np.float64)
                stats[i][f"{key}_mean"], stats[i][f"{key}_max"] = float(inside.mean()), float(inside.max())
                stats[i]["n_voxels"] = int(inside.size)
        for i in indices:
            finding = findings[i]
            box = finding.box if finding.box is not None else _region_box(finding.region, header.affine)
            records[i] = {"image": image.name, "case_id": image.image.name.removesuffix(".nii.gz"),
                          "finding": finding.index, "source": finding.source, "label": finding.label,
                          "score": finding.score, "box": [round(v, 4) for v in box],
                          **stats[i], "eu_high": bool(stats[i]["eu_mean"] > threshold)}
    return records


def run_findings(export: str | Path, detections: str | Path | None = None, labels: str | Path | None = None,
                 image: str | None = None, eu_threshold_hu2: float | None = None, eu_quantile: float | None = None,
                 reference: str | Path | None = None, min_score: float = 0.0, output_dir: str | Path | None = None,
                 overwrite: bool = False) -> Path:
    """Uncertainty per finding of ``detections`` or ``labels`` on ``export``; writes ``findings.json`` and
    ``findings.csv`` to ``output_dir`` (default: the export folder) and returns the JSON's path. Every input is
    checked before anything is written; existing outputs are replaced only with ``overwrite``."""
    if (detections is None) == (labels is None):
        raise ConfigError("give exactly one of findings_cfg#detections (detection JSON) and findings_cfg#labels "
                         "(label volume or JSON)")
    root, images = read_export(export)
    out_dir = Path(output_dir) if output_dir is not None else root
    targets = [output_path(out_dir, "findings", ".json"), output_path(out_dir, "findings", ".csv")]
    check_no_overwrite(targets, overwrite, "findings")
    if detections is not None:
        findings = read_detections(detections, root, images, float(min_score))
        source = Path(detections)
    else:
        findings = read_label_findings(labels, root, images, image)
        source = Path(labels)
    threshold, rule = eu_threshold(eu_threshold_hu2, eu_quantile, reference if reference is not None else root)
    records = find_findings(findings, threshold)
    report = {"export": str(root), "source": str(source.resolve()), "units": "variance, HU^2",
              "box": BOX_CONVENTION, "eu_threshold": {"value_hu2": threshold, "rule": rule,
                                                      "flag": "eu_high = eu_mean > value_hu2"},
              "n_findings": len(records), "findings": records}
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(targets[0]) as tmp_json, atomic_write(targets[1]) as tmp_csv:
        tmp_json.write_text(json.dumps(report, indent=2) + "\n")
        with tmp_csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
            writer.writeheader()
            for record in records:
                row = {k: v for k, v in record.items() if k in _CSV_FIELDS}
                row.update(zip(("box_x", "box_y", "box_z", "box_w", "box_h", "box_d"), record["box"], strict=True))
                writer.writerow({**row, "eu_threshold": threshold})
    n_high = sum(r["eu_high"] for r in records)
    logger.info("%d finding(s) on %d image(s), %d with high EU (threshold %.4g HU^2: %s) -> %s", len(records),
                len({r["image"] for r in records}), n_high, threshold, rule, targets[0])
    return targets[0]
