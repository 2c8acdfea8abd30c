"""Ignite engines and handlers: training, validation/inference, TensorBoard panels, case writing."""

from .checkpoint import AtomicCheckpointSaver
from .evaluator import HyperDiffusionEvaluator
from .metrics import CalibrationScore, SliceMean
from .panels import UncertaintyPanelHandler, panel_image
from .previews import write_preview
from .trainer import HyperDiffusionTrainer
from .writer import CaseWriter

__all__ = [
    "AtomicCheckpointSaver",
    "CalibrationScore",
    "CaseWriter",
    "HyperDiffusionEvaluator",
    "HyperDiffusionTrainer",
    "UncertaintyPanelHandler",
    "SliceMean",
    "panel_image",
    "write_preview",
]
