"""Datalists split by patient and cached per-slice datasets, for both tasks.

- :func:`build_datalist`: case-level entries (a CT series or an MRI file) split into ``training`` /
  ``validation`` / ``test`` by patient, never by slice: the folder's ``datalist.json`` or a hash of the patient id.
- :func:`split_cases`: the cases of some splits, refused with the keys to change when one has none.
- :func:`build_dataset`: per-slice samples through the MONAI chains of :mod:`.transforms`, cached.

A sample is a dict::

    target       float32 [1, S, S] in [-1, 1]    reference image (CT: windowed HU; MRI: scaled reconstruction_esc)
    cond         float32 [1, S, S] in [-1, 1]    FBP of the sparse noisy sinogram / zero-filled reconstruction
    case_id      str (safe as a file stem)       series UID / file stem
    slice_index  int                             axial slice (CT) / slice (MRI) index in the case
    n_slices     int                             slices of this case
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
from collections.abc import Mapping
from pathlib import Path

from monai.data import CacheDataset, PersistentDataset
from torch.utils.data import Dataset

from . import fastmri_knee, luna16
from .config import dataset_root, resolve_data_config
from .datalist import DATALIST_NAME, SPLITS, read_datalist, split_of, write_datalist
from .transforms import ct_transforms, mri_transforms, stable_seed
from .validation import BadFileLog, BadInputError

__all__ = ["SPLITS", "build_datalist", "build_dataset", "physics_key", "slice_entries", "split_cases"]

logger = logging.getLogger(__name__)

_PHYSICS_KEYS = {"ct": ("img_size", "hu_window", "n_views", "noise", "i0", "i0_range", "sigma", "fbp_pitch",
                       "split_seed"),
                 "mri": ("img_size", "mask_type", "center_fractions", "accelerations", "mri_norm", "kspace_noise",
                         "kspace_noise_range", "split_seed")}


def build_datalist(data: Mapping, bad_files: BadFileLog | None = None, write_to: str | Path | None = None
                   ) -> dict[str, list[dict]]:
    """Case-level datalist ``{"training": [...], "validation": [...], "test": [...]}``.

    If the dataset folder holds a ``datalist.json`` (the synthetic sets write one), its splits are used; otherwise
    each patient (``patient_id``: the series UID for LUNA16, the ``patient_id`` attribute for fastMRI) goes to the
    split :func:`~.datalist.split_of` gives it, a pure function of the id, ``split_seed``, ``train_frac`` and
    ``val_frac``: adding or skipping a file moves no other case. Entries are JSON-serialisable dicts (see
    ``luna16.case_entries`` / ``fastmri_knee.case_entries``).

    Args:
        data: the ``data`` config section (completed by :func:`resolve_data_config`).
        bad_files: receives the skipped files when ``on_bad_file="skip"`` (a fresh log if ``None``).
        write_to: also write the result as a Decathlon-style datalist JSON there (image paths relative to it).
    """
    cfg = resolve_data_config(data)
    bad = bad_files if bad_files is not None else BadFileLog(cfg["on_bad_file"])
    bad.on_bad_file = cfg["on_bad_file"]
    reader = luna16 if cfg["task"] == "ct" else fastmri_knee
    root = dataset_root(cfg)
    listed = root / DATALIST_NAME
    if listed.is_file():
        split_paths = read_datalist(listed)
        split_of_image = {str(p): split for split, paths in split_paths.items() for p in paths}
        cases = reader.case_entries(root, int(cfg["img_size"]), bad, paths=[Path(p) for p in split_of_image])
        assign = lambda case: split_of_image[case["image"]]  # noqa: E731
    else:
        cases = reader.case_entries(root, int(cfg["img_size"]), bad)
        fracs = (int(cfg["split_seed"]), float(cfg["train_frac"]), float(cfg["val_frac"]))
        assign = lambda case: split_of(case["patient_id"], *fracs)  # noqa: E731
    if bad.skipped:
        logger.warning("skipped %d bad file(s): %s", len(bad.skipped), ", ".join(str(p) for p, _ in bad.skipped))
    if not cases:
        raise ValueError(f"no usable cases in {root} ({len(bad.skipped)} bad file(s) skipped)")
    datalist = {s: [c for c in cases if assign(c) == s] for s in SPLITS}
    logger.info("datalist of %s: %s", root, ", ".join(f"{len(v)} {k}" for k, v in datalist.items()))
    if write_to is not None:
        path = Path(write_to)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_datalist(path.parent, {s: [c["image"] for c in v] for s, v in datalist.items()}, name=path.name)
    return datalist


_SPLIT_KEYS = {"training": "data#train_frac", "validation": "data#val_frac",
               "test": "data#train_frac + data#val_frac (the test split gets the rest)"}


def split_cases(data: Mapping, *splits: str) -> list[dict]:
    """The cases of ``splits`` in turn (:func:`build_datalist`'s entries, the datalist built once); a split with
    none is a :class:`~.validation.BadInputError` naming the dataset folder and what decides the split."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise KeyError(f"split must be one of {SPLITS}, got {unknown or 'none'}")
    cfg = resolve_data_config(data)
    datalist = build_datalist(cfg)
    empty = [split for split in splits if not datalist[split]]
    if not empty:
        return [case for split in splits for case in datalist[split]]
    root = dataset_root(cfg)
    counts = ", ".join(f"{len(v)} {k}" for k, v in datalist.items())
    if (root / DATALIST_NAME).is_file():
        fix = f"its {DATALIST_NAME} lists none there: add some, or remove the file to split by patient"
    else:
        fix = (f"each patient goes to one split by data#split_seed ({cfg['split_seed']}), data#train_frac "
               f"({cfg['train_frac']}) and data#val_frac ({cfg['val_frac']}): change {_SPLIT_KEYS[empty[0]]}, or add "
               "series")
    raise BadInputError(root, f"no {empty[0]} cases ({counts}); {fix}")


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
                          "n_slices": case["n_slices"], "seed": stable_seed(*seed_parts),
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
    cfg = resolve_data_config(data)
    items = slice_entries(split_cases(cfg, split), cfg)
    transform = (ct_transforms if cfg["task"] == "ct" else mri_transforms)(cfg, train=split == "training")
    if cfg["cache_dir"] is None:
        return CacheDataset(items, transform, num_workers=int(cfg["cache_workers"]), progress=False)
    cache = Path(cfg["cache_dir"]) / f"{cfg['task']}-{split}-{physics_key(cfg)}"
    return PersistentDataset(items, transform, cache_dir=cache)
