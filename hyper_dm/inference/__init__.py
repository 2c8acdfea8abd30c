"""Volume-native inference on what the user has: one file, a folder or a datalist, simulated or measured input.

Public API::

    find_cases(source, task) -> [{"image", "case_id"}, ...]          # file | folder | DICOM folder | datalist JSON
    load_case(entry, data, mode, img_size) -> loaded case dict        # MONAI readers, MetaTensor geometry
    VolumeReconstructor(network, sampler, img_size, M, N)(cond, gain, offset) -> {mean, eu, au, total}
    HyperDM.from_bundle(...).reconstruct(volume, M=..., N=...)        # one call from Python
    scale_like_calibration(case, calibration)                         # MRI without a fully sampled max: its scale
    apply_calibration(raw, case, reconstructor, calibration)          # calibrated std + input check of one case
    CaseDataset, VolumeEvaluator, case_entries, case_metrics          # the bundle's inference workflow
    calibration_dataset, CalibrationFitter, scale_ratio_cases         # its 'calibrate' run id
    calibration_holdout(case_ids, residuals, noise_levels, eu, bins)  # each validation patient held out
"""

from .calibrated import apply_calibration, load_calibration, scale_like_calibration
from .engine import (
    CalibrationFitter,
    CaseDataset,
    VolumeEvaluator,
    calibration_dataset,
    calibration_holdout,
    case_entries,
    case_metrics,
    run_inference,
    scale_ratio_cases,
)
from .inputs import find_cases
from .loading import InputMode, load_case, to_source_layout
from .model import HyperDM, load_hypernet_state
from .reconstructor import OUTPUTS, VolumeReconstructor

__all__ = [
    "OUTPUTS", "CalibrationFitter", "CaseDataset", "HyperDM", "InputMode", "VolumeEvaluator", "VolumeReconstructor",
    "apply_calibration", "calibration_dataset", "calibration_holdout", "case_entries", "case_metrics", "find_cases",
    "load_calibration", "load_case", "load_hypernet_state", "run_inference", "scale_like_calibration",
    "scale_ratio_cases", "to_source_layout",
]
