"""Datasets for Hyper-DM: LUNA16 CT and fastMRI knee single-coil in their real formats, synthetic stand-ins,
MONAI transforms with the acquisition physics, and the model-range intensity mapping.

Public API::

    build_datalist(data) -> {"training": [...], "validation": [...], "test": [...]}    # case-level, by patient
    split_cases(data, *splits) -> those splits' case entries (an error naming the keys when one has none)
    build_dataset(data, split) -> torch Dataset of per-slice sample dicts               # cached MONAI dataset
    split_of(patient_id, split_seed, train_frac, val_frac), read_datalist(path), write_datalist(root, splits)
    to_hu(x, hu_window), to_magnitude(x, scale), physical_map(task, hu_window, magnitude_scale)
    resolve_data_config(data) (defaults: the bundle's common.yaml), BadInputError, BadFileLog

See :mod:`.config` for the keys, :mod:`.datasets` for the sample layout.
"""

from .config import resolve_data_config
from .datalist import read_datalist, split_of, write_datalist
from .datasets import build_datalist, build_dataset, split_cases
from .intensity import physical_map, to_hu, to_magnitude
from .validation import BadFileLog, BadInputError

__all__ = [
    "BadFileLog", "BadInputError", "build_datalist", "build_dataset",
    "physical_map", "read_datalist", "resolve_data_config", "split_cases", "split_of", "to_hu", "to_magnitude",
    "write_datalist",
]
