"""Datasets for Hyper-DM: LUNA16 CT and fastMRI knee single-coil in their real formats, synthetic stand-ins,
MONAI transforms with the acquisition physics, and the model-range intensity mapping.

Public API::

    build_datalist(data) -> {"training": [...], "validation": [...], "test": [...]}    # case-level, by patient
    build_dataset(data, split) -> torch Dataset of per-slice sample dicts               # cached MONAI dataset
    case_slices(data, split) -> iterator of (case_id, [samples in slice order])
    to_hu(x, hu_window), to_magnitude(x, scale), physical_map(task, hu_window, magnitude_scale)
    resolve_data_config(data), DATA_DEFAULTS, BadInputError, BadFileLog

See :mod:`.config` for the keys, :mod:`.datasets` for the sample layout.
"""

from .config import DATA_DEFAULTS, resolve_data_config
from .datasets import build_datalist, build_dataset, case_slices
from .intensity import physical_map, to_hu, to_magnitude
from .validation import BadFileLog, BadInputError

__all__ = [
    "DATA_DEFAULTS", "BadFileLog", "BadInputError", "build_datalist", "build_dataset", "case_slices",
    "physical_map", "resolve_data_config", "to_hu", "to_magnitude",
]
