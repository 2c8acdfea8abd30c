"""Datalists split by patient and cached per-slice datasets, for both tasks.

- :func:`build_datalist`: case-level entries (a CT series or an MRI file) split into ``training`` /
  ``validation`` / ``test`` by patient, never by slice, as a pure function of ``split_seed``.
- :func:`build_dataset`: per-slice samples through the MONAI chains of :mod:`.transforms`, cached.
- :func:`case_slices`: the samples of a split grouped per case, in slice order (for volume-wise inference).

A sample is a dict::

    target       float32 [1, S, S] in [-1, 1]    reference image (CT: windowed HU; MRI: scaled reconstruction_esc)
    cond         float32 [1, S, S] in [-1, 1]    FBP of the sparse noisy sinogram / zero-filled reconstruction
    case_id      str (safe as a file stem)       series UID / file stem
    slice_index  int                             axial slice (CT) / slice (MRI) index in the case
    n_slices     int                             slices of this case
    affine       float64 [4, 4]                  RAS affine of the case volume [S, S, n_slices] (slices stacked on
                                                 the last axis in slice_index order), as nibabel expects
    image        str                             source file
    pixel_mm     float (CT)                      in-plane pixel size of the S x S grid
    scale        float (MRI)                     magnitude scale (the model sees 2 m / scale - 1)
    intensity_scale, intensity_offset  float     physical = scale * x + offset (HU / magnitude), see physical_map

Example::

    >>> data = {"task": "ct", "dataset_dir": None}         # synthetic LUNA16-format set
    >>> train = build_dataset(data, "training")
    >>> loader = monai.data.DataLoader(train, batch_size=8, shuffle=True, num_workers=2)
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from monai.data import CacheDataset, PersistentDataset
from torch.utils.data import Dataset

from . import fastmri_knee, luna16
from .config import dataset_root, resolve_data_config
from .transforms import ct_transforms, mri_transforms, stable_seed
from .validation import BadFileLog

__all__ = ["SPLITS", "build_datalist", "build_dataset", "case_slices", "physics_key", "slice_entries",
           "split_counts"]

logger = logging.getLogger(__name__)

SPLITS = ("training", "validation", "test")
_PHYSICS_KEYS = {"ct": ("img_size", "hu_window", "n_views", "noise", "i0", "sigma", "split_seed"),
                 "mri": ("img_size", "mask_type", "center_fractions", "accelerations", "mri_norm", "split_seed")}


def split_counts(n: int, train_frac: float, val_frac: float) -> tuple[int, int, int]:
    """``(n_train, n_val, n_test)`` for ``n`` patients; a split with a positive fraction gets at least one."""
    test_frac = 1.0 - train_frac - val_frac
    n_val = max(round(n * val_frac), 1 if val_frac > 0 else 0)
    n_test = max(round(n * test_frac), 1 if test_frac > 1e-9 else 0)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{n} patients cannot be split with train_frac={train_frac}, val_frac={val_frac}")
    return n_train, n_val, n_test


def build_datalist(data: Mapping, bad_files: BadFileLog | None = None) -> dict[str, list[dict]]:
    """Case-level datalist ``{"training": [...], "validation": [...], "test": [...]}``.

    Patients (``patient_id``: the series UID for LUNA16, the ``patient_id`` attribute for fastMRI) are sorted,
    shuffled with ``split_seed`` and cut by ``train_frac``/``val_frac``; all cases of a patient land in one split.
    Entries are JSON-serialisable dicts (see ``luna16.case_entries`` / ``fastmri_knee.case_entries``).

    Args:
        data: the ``data`` config section (defaults filled in by :func:`resolve_data_config`).
        bad_files: receives the skipped files when ``on_bad_file="skip"`` (a fresh log if ``None``).
    """
    cfg = resolve_data_config(data)
    bad = bad_files if bad_files is not None else BadFileLog(cfg["on_bad_file"])
    bad.on_bad_file = cfg["on_bad_file"]
    reader = luna16 if cfg["task"] == "ct" else fastmri_knee
    cases = reader.case_entries(dataset_root(cfg), int(cfg["img_size"]), bad)
    if bad.skipped:
        logger.warning("skipped %d bad file(s): %s", len(bad.skipped), ", ".join(str(p) for p, _ in bad.skipped))
    if not cases:
        raise ValueError(f"no usable cases in {dataset_root(cfg)} ({len(bad.skipped)} bad file(s) skipped)")
    patients = sorted({c["patient_id"] for c in cases})
    order = np.random.default_rng(int(cfg["split_seed"])).permutation(len(patients))
    n_train, n_val, _ = split_counts(len(patients), float(cfg["train_frac"]), float(cfg["val_frac"]))
    split_of = {}
    for rank, i in enumerate(order):
        split_of[patients[i]] = SPLITS[0] if rank < n_train else SPLITS[1] if rank < n_train + n_val else SPLITS[2]
    return {s: [c for c in cases if split_of[c["patient_id"]] == s] for s in SPLITS}


def slice_entries(cases: list[dict], data: Mapping) -> list[dict]:
    """Per-slice items of ``cases`` in case then slice order, with the physics ``seed`` of each.

    CT seeds differ per slice; MRI seeds per file (one mask per file), both derived from ``split_seed``.
    """
    items = []
    for case in cases:
        extra = {"pixel_mm": case["pixel_mm"]} if data["task"] == "ct" else {"scale_max": case["scale_max"]}
        for k in range(int(case["n_slices"])):
            seed_parts = (data["split_seed"], case["case_id"], k) if data["task"] == "ct" else \
                (data["split_seed"], case["case_id"])
            items.append({"image": case["image"], "case_id": case["case_id"], "slice_index": k,
                          "n_slices": case["n_slices"], "affine": case["affine"], "seed": stable_seed(*seed_parts),
                          **extra})
    return items


def physics_key(data: Mapping) -> str:
    """Hash of every config value the cached content depends on (part of the persistent cache folder name)."""
    cfg = {k: data[k] for k in _PHYSICS_KEYS[data["task"]]}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_dataset(data: Mapping, split: str) -> Dataset:
    """Cached per-slice dataset of ``split`` (``"training"``, ``"validation"`` or ``"test"``).

    Training samples get new physics noise (CT) or a new mask (MRI) every time they are drawn; validation and test
    samples are deterministic (seeded per slice / per file). ``cache_dir=None`` caches in memory
    (``monai.data.CacheDataset``, filled when the dataset is built); otherwise ``monai.data.PersistentDataset`` under
    ``<cache_dir>/<task>-<split>-<physics_key>``, so changing any physics parameter starts a new cache.
    """
    if split not in SPLITS:
        raise KeyError(f"split must be one of {SPLITS}, got {split!r}")
    cfg = resolve_data_config(data)
    items = slice_entries(build_datalist(cfg)[split], cfg)
    transform = (ct_transforms if cfg["task"] == "ct" else mri_transforms)(cfg, train=split == "training")
    if cfg["cache_dir"] is None:
        return CacheDataset(items, transform, num_workers=int(cfg["cache_workers"]), progress=False)
    cache = Path(cfg["cache_dir"]) / f"{cfg['task']}-{split}-{physics_key(cfg)}"
    return PersistentDataset(items, transform, cache_dir=cache)


def case_slices(data: Mapping, split: str) -> Iterator[tuple[str, list[dict]]]:
    """``(case_id, samples)`` per case of ``split``, samples in ``slice_index`` order (``len == n_slices``)."""
    dataset = build_dataset(data, split)
    case_id, samples = None, []
    for i in range(len(dataset)):
        sample = dataset[i]
        if samples and sample["case_id"] != case_id:
            yield case_id, samples
            samples = []
        case_id = sample["case_id"]
        samples.append(sample)
    if samples:
        yield case_id, samples
